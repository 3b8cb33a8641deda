"""The README and docs/ cannot drift from the code's recorded figures or from the tree.

- The README's headline results table: every number of a row's result cell equals, to the precision
  printed, the figure in the JSON file of the bench/results/NAME.md the row links to
  (bench/results/NAME.json); HEADLINE says which figures each file's row quotes, in order.
- The README's demo table: every number of its "trained" and "result" cells equals the figure in
  bench/results/demo.json, which scripts/demo.py's demo_figures recorded from a run.
- scripts/demo.py's demo_figures reads a pipeline's run directories as the trainers write them.
- README.md has at most 250 lines; every docs/*.md opens with its command (a fenced code block right
  after the title); every relative link of README.md and docs/*.md points to an existing file, and
  an anchor into a Markdown file to one of its headings.
"""

import json
import re
import runpy
import shutil
import signal
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# a number as printed: optional sign, thousands separated by commas, optional decimals; not a part
# of a word (bf16, fp32, cifar10) or of a longer number
NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pipeline_seconds(d):
    levels = d["levels"]
    return levels["top"]["total_s"]["bf16"] + levels["bottom"]["total_s"]["bf16"] + d["decode"]["bf16"]


def as_asked(setting):
    return 100 * setting["as_asked"] / setting["samples"]


def all_photos_bits(d, sizes):
    """Bits per sub-pixel over every photo of the codec benchmark, from file `sizes` (photo -> bytes)."""
    sub_pixels = sum(3 * height * width for height, width in d["config"]["photos"].values())
    return 8 * sum(sizes.values()) / sub_pixels


# bench/results/NAME.json -> the figures its headline row quotes, in the order printed
HEADLINE = {
    "sample": lambda d: [d["models"][name]["speedup"] for name in ("top", "bottom", "cpu-small")],
    "sample-pipeline": lambda d: [pipeline_seconds(d), pipeline_seconds(d) / 60],
    "train": lambda d: [d["cases"]["cifar10"]["train"]["bf16"]["median_step_s"],
                        d["cases"]["cifar10"]["train"]["bf16"]["speedup_vs_fp32"]],
    "precision": lambda d: [statistics.mean(d["test_bits_fp32"]["bf16_minus_fp32"]),
                            100 * (next(r["lr"] for r in d["runs"] if r["run"] == "control")
                                   / next(r["lr"] for r in d["runs"] if r["run"] == "fp32") - 1),
                            statistics.mean(d["test_bits_fp32"]["control_minus_fp32"])],
    "codecs": lambda d: [d["runs"]["0"][-1]["held_out"],
                         d["codecs"]["PNG (compress_level 9, optimize)"]["held_out"],
                         d["codecs"]["WebP lossless (method 6)"]["held_out"]],
    "codec": lambda d: [*(value for mark, model in zip(d["config"]["marks"], d["models"])
                          for value in (all_photos_bits(d, model["context"]["bytes"]), mark)),
                        *(all_photos_bits(d, d["coders"][name]["bytes"]) for name in
                          ("PNG (compress_level 9, optimize)", "WebP lossless (method 6)", "JPEG-XL lossless (effort 9)"))],
    "eval": lambda d: [d["stages"]["samples"]["cas"], d["stages"]["samples"]["cas_real_ceiling"],
                       d["stages"]["top_prior"]["heldout_bits_per_code"],
                       d["stages"]["bottom_prior"]["heldout_bits_per_code"]],
    "guidance": lambda d: [as_asked(d["settings"]["guidance 0 (unconditional)"]),
                           as_asked(d["settings"]["guidance 1 (conditional)"]),
                           as_asked(d["settings"]["guidance 4"]), d["settings"]["guidance 4"]["drawing"]["guidance"]],
    "ood": lambda d: [d["models"]["pixel model"]["aurocs"]["bits/dim"][kind]
                      for kind in ("uniform noise", "colour-inverted", "another photo (camera)")],
    "lmdb": lambda d: [d["read"]["main process"]["records_per_s"]],
    "streams-steps": lambda d: [statistics.mean(d["two_minus_one"]), statistics.mean(d["step_time_ratio"])],
    "gpu": lambda d: [1 / d["training"][0]["seconds_per_step"], 100 * d["training"][0]["flops_per_s"]
                      / d["bf16_matmul_peak_flops"]],
}

# the demo table's stage -> the figures of its "trained" and "result" cells, in the order printed
DEMO = {
    "VQ-VAE": lambda f: [f["vqvae"]["steps"], f["vqvae"]["batch_size"], f["vqvae"]["test_mse"],
                         f["vqvae"]["psnr_db"], 100 * f["vqvae"]["top_usage"], 100 * f["vqvae"]["bottom_usage"]],
    "codes": lambda f: [f["codes"]["records"]],
    "top prior": lambda f: [f["top_prior"]["steps"], f["top_prior"]["max_minutes"],
                            f["top_prior"]["validation_bits_per_code"]],
    "bottom prior": lambda f: [f["bottom_prior"]["steps"], f["bottom_prior"]["max_minutes"],
                               f["bottom_prior"]["validation_bits_per_code"]],
}


def numbers(cell):
    """The numbers printed in a table cell, as printed; code spans (`cpu-small`) and link targets skipped."""
    cell = re.sub(r"`[^`]*`", "", LINK.sub(lambda m: m.group(0).split("](")[0], cell))
    return NUMBER.findall(cell)


def equal_as_printed(printed, value):
    """Whether `value` rounds to the number `printed` at the precision printed."""
    digits = printed.replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return abs(float(digits) - value) <= 0.5 * 10**-decimals + 1e-9


def table_after(text, marker):
    """The rows (lists of cells) of the first Markdown table after the line containing `marker`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table after {marker!r}"
    return rows[2:]  # after the header and its rule


def check_row(what, printed, expected):
    assert len(printed) == len(expected), f"{what}: prints {printed}, the results file has {len(expected)} figures"
    for text, value in zip(printed, expected):
        assert equal_as_printed(text, value), f"{what}: prints {text}, the results file has {value}"


def test_headline_table_quotes_the_results_files():
    rows = table_after(README.read_text(), "## Results")
    seen = []
    for label, result, source in rows:
        targets = [t for t in LINK.findall(source) if t.startswith("bench/results/")]
        assert len(targets) == 1, f"row {label!r} links no single bench/results file: {source}"
        name = Path(targets[0]).stem
        assert name in HEADLINE, f"row {label!r}: no figures known for bench/results/{name}.json (add them to HEADLINE)"
        figures = json.loads((RESULTS / f"{name}.json").read_text())
        check_row(f"README headline row {label!r}", numbers(result), HEADLINE[name](figures))
        seen.append(name)
    assert sorted(seen) == sorted(HEADLINE), "HEADLINE and the README's headline rows differ"


def test_demo_table_quotes_the_recorded_demo_run():
    recorded = json.loads((RESULTS / "demo.json").read_text())
    assert {"date", "command", "cpu", "note", "figures"} <= recorded.keys()
    rows = table_after(README.read_text(), "One recorded run of `make demo`")
    seen = []
    for stage, trained, result in rows:
        name = stage.split(" (")[0]
        assert not numbers(stage), f"demo row {stage!r}: figures belong in the checked cells"
        assert name in DEMO, f"demo row {stage!r}: no figures known (add them to DEMO)"
        check_row(f"README demo row {name!r}", numbers(trained) + numbers(result), DEMO[name](recorded["figures"]))
        seen.append(name)
    assert sorted(seen) == sorted(DEMO)


def test_numbers_as_printed():
    assert numbers("155x top, `cpu-small` 61x, 43,084 records/s in bf16 at +0.098 ([a](b/c2.md))") == \
        ["155", "61", "43,084", "+0.098"]
    assert equal_as_printed("2.59", 2.5867) and not equal_as_printed("2.58", 2.5867)
    assert equal_as_printed("43,084", 43084.4) and not equal_as_printed("43,100", 43084.4)


def demo_script():
    """scripts/demo.py's functions, loaded as `python scripts/demo.py` loads them (without running
    main); Python's own Ctrl-C handler, which the script replaces while it starts, put back."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return runpy.run_path(str(ROOT / "scripts" / "demo.py"))
    finally:
        signal.signal(signal.SIGINT, handler)


def write_run(run_dir, records, train_config):
    """The two files of a run directory that demo_figures reads, as the trainers write them."""
    from pipelines.store import run_files

    run_dir.mkdir(exist_ok=True)
    (run_dir / run_files.LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / run_files.STATE_DIR).mkdir()
    progress = {"step": records[-1]["step"], "train_config": train_config, "model_config": "{}"}
    (run_dir / run_files.STATE_DIR / run_files.PROGRESS_FILE).write_text(json.dumps(progress))


def test_demo_figures_reads_the_run_directories(tiny_pipeline, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(tiny_pipeline, out)
    write_run(out / "vqvae", [
        {"step": 2, "train_mse": 0.5, "eval_batches": 1, "mse": 0.4, "top_usage": 0.3, "bottom_usage": 0.2},
        {"step": 4, "train_mse": 0.3, "final": True, "mse": 0.25, "top_perplexity": 3.0, "bottom_perplexity": 4.0,
         "top_usage": 0.5, "bottom_usage": 0.75}],
        {"preset": "cpu-small", "size": 16, "batch_size": 2, "max_minutes": 1.0})
    for level, bits in (("top", 2.5), ("bottom", 3.5)):
        write_run(out / level, [{"step": 3, "train_bits": bits + 0.1, "final": True, "test_bits": bits}],
                  {"preset": f"cpu-{level}", "max_minutes": 0.5, "label_dropout": 0.1})
    figures = json.loads(demo_script()["write_figures"](out).read_text())
    assert figures["vqvae"] == {"preset": "cpu-small", "size": 16, "steps": 4, "batch_size": 2, "test_mse": 0.25,
                                "psnr_db": pytest.approx(10 * 1.2041199826559248), "top_usage": 0.5,
                                "bottom_usage": 0.75}
    assert figures["codes"] == {"records": 40}  # tiny_pipeline: 2 classes x 20 training images
    assert figures["top_prior"] == {"preset": "cpu-top", "steps": 3, "max_minutes": 0.5, "label_dropout": 0.1,
                                    "validation_bits_per_code": 2.5}
    assert figures["bottom_prior"]["validation_bits_per_code"] == 3.5


def test_demo_figures_refuses_an_unfinished_stage(tiny_pipeline, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(tiny_pipeline, out)
    write_run(out / "vqvae", [{"step": 2, "train_mse": 0.5, "eval_batches": 1, "mse": 0.4}], {"preset": "cpu-small"})
    with pytest.raises(ValueError, match="no final evaluation"):
        demo_script()["demo_figures"](out)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines (at most 250: move the detail to docs/)"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_page_opens_with_its_command(page):
    lines = [line for line in page.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name} does not start with a title"
    assert lines[1].startswith("```"), f"{page.name}: the line after the title is not its command (a fenced block)"


def headings(page):
    """The anchors GitHub gives the headings of a Markdown file (outside fenced blocks)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def outside_code(text):
    """The text without fenced blocks and code spans, where a bracket is not a link."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_point_to_files(page):
    for target in LINK.findall(outside_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in headings(file), f"{page.name} links {target}: no such heading in {file.name}"
