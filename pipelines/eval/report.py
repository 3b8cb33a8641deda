"""One self-contained HTML page that shows whether a pipeline's stages are good: per run, its learning
curves (from log.jsonl), its final evaluation, its warnings (pipelines.train.diagnostics), its evaluation
numbers (eval.json) and its pictures; per pipeline, its samples, the code frequencies of each
codebook level in its code database, and its evaluation numbers. Every image is embedded as a data
URI, so the page is one file that opens anywhere, offline.

A directory given is a run (it holds log.jsonl or model.safetensors) or a pipeline: a directory whose
subfolders are runs (scripts/demo.py's vqvae/, top/ and bottom/ beside codes.lmdb and samples.png;
a three-level pipeline's middle/ between them).

Evaluation numbers: eval.json as `scripts/evaluate.py --json` writes it, {stage: {name: value}} with
the stages pixels, vqvae, one per level's prior (top_prior, [middle_prior,] bottom_prior) and samples
(a prior's name the code database they
were measured on, and whether it is the one the prior trained on). A run shows its stage's numbers
from its own eval.json, else from its parent directory's (the pipeline's); a pipeline shows the
stages that none of its runs shows (its samples').
"""

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from tqdm.auto import tqdm

from pipelines.store import run_files
from pipelines.store.checkpoint import CHECKPOINT_NAME, CheckpointError, checkpoint_stage
from pipelines.store.codes import CodeDataset, level_grids
from pipelines.store.outputs import check_output, output_file
from pipelines.store.results import EVAL_FILE, read_evaluation

FIGURE_DPI = 100  # a plot 11 inches wide fills the page's 1100 pixels
MIN_SHOWN_WIDTH = 400
CODES_DIR = "codes.lmdb"  # a pipeline's code database (scripts/demo.py's layout)
STAGE_ORDER = ("vqvae", "top", "middle", "bottom")  # a pipeline's runs in this order, then the others by name (level0, ...)
PICTURES = {"reconstructions.png": "test images (top rows) above their reconstructions (bottom rows)",
            "samples.png": "samples (scripts/demo.py draws one row per class)"}
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em}img{max-width:100%;image-rendering:pixelated}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.warning{background:#fff3cd;border-left:4px solid #e0a800;padding:.5em;margin:.5em 0}.none{color:#777}"""


def is_run(path):
    return (path / run_files.LOG_FILE).is_file() or (path / CHECKPOINT_NAME).is_file()


def runs_of(path):
    """The runs a directory given holds: itself, or its subfolders that are runs (a pipeline)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory" if path.exists() else f"{path} does not exist")
    if is_run(path):
        return [path]
    runs = sorted((p for p in path.iterdir() if p.is_dir() and is_run(p)),
                  key=lambda p: (STAGE_ORDER.index(p.name) if p.name in STAGE_ORDER else len(STAGE_ORDER), p.name))
    if not runs:
        raise FileNotFoundError(f"{path} holds no run: no {run_files.LOG_FILE} or {CHECKPOINT_NAME} in it or in "
                                "its subfolders")
    return runs


def write_report(paths, out, curves=None):
    """Writes the report of the directories `paths` (runs or pipelines) to `out`, and, given `curves`,
    the losses of all their runs side by side as a PNG there; returns the report's path. Every
    directory is checked before anything is written."""
    directories = [(Path(p), runs_of(p)) for p in paths]
    check_output(out, "--out", (".html", ".htm"))
    if curves:
        check_output(curves, "--curves", (".png",))
    for directory in {d for path, runs in directories for run in runs for d in (path, run, run.parent)}:
        read_evaluation(directory)  # a damaged eval.json stops the report before any work
    logs = evaluated_logs([run for _, runs in directories for run in runs])
    if curves and not logs:
        raise ValueError(f"no run logged an evaluation in its {run_files.LOG_FILE}: no curves for {curves}")
    shown_codes, body = set(), []
    for path, runs in directories:
        if runs != [path]:
            body += pipeline_parts(path, runs, shown_codes)
        for run in runs:
            body += run_parts(run, shown_codes)
    title = "Report: " + ", ".join(str(p) for p, _ in directories)
    with output_file(out) as tmp:
        tmp.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                       f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
                       + "\n".join(body) + "\n</body></html>\n")
    if curves:
        with output_file(curves) as tmp:
            tmp.write_bytes(overview_png(logs))
    return Path(out)


def evaluated_logs(runs):
    """{run name (its path where two share a name): its log records} of the runs that logged an
    evaluation."""
    names = [run.name for run in runs]
    logs = {run.name if names.count(run.name) == 1 else str(run): run_files.read_log(run) for run in runs}
    return {name: log for name, log in logs.items() if log}


def pipeline_parts(path, runs, shown_codes):
    """A pipeline's own section: its runs' losses, its samples, its evaluation numbers and its code
    frequencies."""
    parts = [f"<h2>Pipeline {html.escape(str(path))}</h2>"]
    if logs := evaluated_logs(runs):
        parts.append(image_tag(overview_png(logs), f"learning curves of the runs of {path}"))
    shown = {stage_of(run) for run in runs}
    stages = {stage: numbers for stage, numbers in read_evaluation(path).items() if stage not in shown}
    parts += [*pictures(path), "<h3>Evaluation</h3>"]
    none = f"<p class='none'>{html.escape(not_evaluated(path, 'samples'))}</p>"
    parts.append(table(flatten(stages)) if stages else none)
    return parts + code_parts(path / CODES_DIR, shown_codes)


def run_parts(run, shown_codes):
    """A run's section: what it is, its curves, final evaluation, warnings, evaluation and pictures."""
    log, config = run_files.read_log(run), stored_config(run)
    parts = [f"<h2>Run {html.escape(str(run))}</h2>", f"<p>{html.escape(describe(config, log))}</p>"]
    if log:
        parts.append(image_tag(curves_png(log), f"learning curves of {run}"))
    if not periodic_and_final(log)[0]:
        parts.append(f"<p class='none'>no periodic evaluation in {run_files.LOG_FILE}: only the final one is "
                     "plotted (a trainer evaluates every --eval-every steps)</p>")
    final = [r for r in log if r.get("final")]
    if final:
        parts += ["<h3>Final evaluation (whole held-out split, from training)</h3>",
                  table({k: v for k, v in final[-1].items() if k not in ("final", "warnings")})]
    warnings = [message for r in log for message in r.get("warnings", {}).values()]
    parts += ["<h3>Warnings</h3>", *(f"<div class='warning'>{html.escape(m)}</div>" for m in warnings)]
    if not warnings:
        parts.append("<p class='none'>none</p>")
    parts += ["<h3>Evaluation</h3>", evaluation_table(run), *pictures(run)]
    if config.get("codes"):
        parts += code_parts(Path(config["codes"]), shown_codes)
    return parts


def stored_config(run):
    """The run's training settings from its state (empty when it has none, or a damaged one)."""
    try:
        return run_files.read_progress(run)["train_config"]
    except (FileNotFoundError, run_files.StateError):
        return {}


def describe(config, log):
    """The run's main settings and how far it trained."""
    names = ("preset", "level", "data", "codes", "size", "batch_size")
    settings = ", ".join(f"{name} {config[name]}" for name in names if config.get(name) is not None)
    steps = f"; logged up to step {max(r['step'] for r in log)} of {config.get('steps', '?')}" if log else ""
    return (settings or "no stored settings (no state/ in the run)") + steps


def stage_of(run):
    """The stage of scripts/evaluate.py's results that evaluates `run`: the one its checkpoint records
    (None while it holds no readable checkpoint)."""
    try:
        return checkpoint_stage(run)
    except CheckpointError:
        return None


def not_evaluated(directory, stage):
    return f"not evaluated: no {stage} results in {directory / EVAL_FILE}"


def evaluation_table(run):
    """The numbers of the run's stage from its eval.json or its parent's, or a line that says there are none."""
    stage = stage_of(run)
    if stage is None:
        return f"<p class='none'>not evaluated: {html.escape(str(run))} holds no readable checkpoint</p>"
    for directory in (run, run.parent):
        if stage in (results := read_evaluation(directory)):
            source = html.escape(f"{directory / EVAL_FILE}{prior_database(results[stage])}")
            return f"<p>from {source}</p>" + table(flatten(results[stage]))
    return f"<p class='none'>{html.escape(not_evaluated(run, stage))} or {html.escape(str(run.parent / EVAL_FILE))}</p>"


def prior_database(numbers):
    """What a prior's numbers were measured on, in words ("" for other stages and older results)."""
    if "trained_on_database" not in numbers:
        return ""
    if numbers["trained_on_database"]:
        return f", on {numbers['database']}, the code database it trained on"
    return (f", on {numbers['database']}, not the code database it trained on: every record is held out "
            "(no train figure, no gap)")


def flatten(numbers, prefix=""):
    flat = {}
    for name, value in numbers.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name} / "))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def table(values):
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(number(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def number(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def pictures(directory):
    """The pictures a run or pipeline wrote, embedded, each with what it shows."""
    return [f"<h3>{name}</h3><p>{html.escape(caption)}</p>" + image_tag((directory / name).read_bytes(), caption)
            for name, caption in PICTURES.items() if (directory / name).is_file()]


def image_tag(png, alt):
    """An <img> of PNG bytes as a data URI; a small picture (a grid of 8x8 images) enlarged by a whole
    factor to at least MIN_SHOWN_WIDTH pixels, so that it is seen."""
    width = Image.open(io.BytesIO(png)).width
    shown = width * max(1, MIN_SHOWN_WIDTH // width)
    return (f"<img alt='{html.escape(alt)}' style='width:{shown}px' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")


def png_of(figure):
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def panel_of(key):
    """Which plot of the learning curves a logged number goes to."""
    for suffix in ("_usage", "_perplexity"):
        if key.endswith(suffix):
            return suffix[1:]
    return "loss"


def curves_png(log):
    """Every number of the periodic evaluations against the step, one plot per kind (losses, codebook
    usage, perplexity), two plots a row."""
    panels = sorted({panel_of(k) for k in logged_numbers(log)}, key=("loss", "usage", "perplexity").index)
    rows, columns = math.ceil(len(panels) / 2), min(len(panels), 2)
    figure = Figure(figsize=(5.5 * columns, 3.6 * rows), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        plot_panel(ax, log, panel, panel)
    return png_of(figure)


def overview_png(logs):
    """The losses of several runs ({name: log}), one plot each, side by side: a pipeline at a glance."""
    figure = Figure(figsize=(11, 3.6), dpi=FIGURE_DPI, layout="constrained")
    for ax, (name, log) in zip(figure.subplots(1, len(logs), squeeze=False)[0], logs.items()):
        plot_panel(ax, log, "loss", name)
    return png_of(figure)


def periodic_and_final(log):
    """The periodic evaluations in step order (a step evaluated again: its last line) and the final one
    (a list of at most one)."""
    by_step = {r["step"]: r for r in log if not r.get("final")}
    return [by_step[s] for s in sorted(by_step)], [r for r in log if r.get("final")][-1:]


def logged_numbers(log):
    """The names of the numbers the evaluations logged (the last periodic one, else the final one)."""
    periodic, final = periodic_and_final(log)
    return [k for k, v in (periodic or final)[-1].items()
            if k not in ("step", "eval_batches") and isinstance(v, (int, float)) and not isinstance(v, bool)]


def plot_panel(ax, log, panel, title):
    """The numbers of one kind against the step, the final evaluation's as stars, and a dashed line
    where a warning was given."""
    periodic, final = periodic_and_final(log)
    for key in (k for k in logged_numbers(log) if panel_of(k) == panel):
        steps = [r["step"] for r in periodic if key in r]
        line, = ax.plot(steps, [r[key] for r in periodic if key in r], marker=".", label=curve_label(key))
        for r in final:
            if key in r:
                ax.plot([r["step"]], [r[key]], marker="*", markersize=12, color=line.get_color())
    for r in log:
        if r.get("warnings"):
            ax.axvline(r["step"], color="#e0a800", linestyle="--")
    ax.set(xlabel="step", title=title + (" (star: final, whole split)" if final else ""))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def curve_label(key):
    return f"{key} (running average)" if key.startswith("train_") else f"{key} (held-out)"


def code_parts(path, shown_codes):
    """Frequency histograms of every codebook level over a code database, once per database (a copy
    of one shown, its metadata the same, is not shown again)."""
    if not path.is_dir():
        return []
    dataset = CodeDataset(path)
    identity = json.dumps(dataset.metadata, sort_keys=True)
    if identity in shown_codes:
        return []
    shown_codes.add(identity)
    counts = code_counts(dataset)
    caption = (f"codes of the {len(dataset):,} images in {path} (the images the database was extracted from), "
               "codebook entries sorted by frequency")
    return [f"<h3>Codebook usage</h3><p>{html.escape(caption)}</p>", image_tag(histograms_png(counts), caption)]


def code_counts(dataset):
    """{level: (n_codes,) int64 counts} of every record of a CodeDataset."""
    counts = {level: np.zeros(n_codes, dtype=np.int64) for level, _, n_codes in level_grids(dataset.metadata)}
    for index in tqdm(range(len(dataset)), desc="codes", leave=False):
        for level, codes in zip(counts, dataset[index][:-1]):  # every level's grid, then the label
            counts[level] += np.bincount(codes.flatten().numpy(), minlength=len(counts[level]))
    return counts


def histograms_png(counts):
    figure = Figure(figsize=(5.5 * len(counts), 3.4), dpi=FIGURE_DPI, layout="constrained")
    for ax, (level, count) in zip(figure.subplots(1, len(counts), squeeze=False)[0], counts.items()):
        frequency = np.sort(count)[::-1] / count.sum()
        used = int((count > 0).sum())
        entropy = -sum(p * math.log(p) for p in frequency if p > 0)
        ax.bar(np.arange(len(frequency)), frequency, width=1.0)
        ax.set(title=f"{level}: {used} of {len(count)} codes used, perplexity {math.exp(entropy):.1f}",
               xlabel="codebook entries, most frequent first", ylabel="share of positions")
    return png_of(figure)
