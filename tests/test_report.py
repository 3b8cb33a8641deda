"""scripts/report.py on a tiny VQ-VAE run that gave warnings, its refusals, and its page in headless Chromium."""

import base64
import html
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from launch import ok, run_script
from pipelines.eval.report import write_report
from pipelines.store import run_files
from pipelines.train import diagnostics
from pipelines.train.vqvae import VQVAETrainConfig, train

CHROMIUM = Path("/usr/bin/chromium")


class Links(HTMLParser):
    """Every src and href of a page, and the data of its images by their alt text."""

    def __init__(self, text):
        super().__init__()
        self.links, self.images = [], {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[name] for name in ("src", "href") if name in attrs]
        if tag == "img":
            self.images[attrs["alt"]] = attrs["src"]


@pytest.fixture(scope="module")
def warned_run(image_folder, tmp_path_factory, one_thread):
    """A 3-step VQ-VAE run whose usage warnings fire (the threshold raised above any usage)."""
    out = tmp_path_factory.mktemp("report") / "vqvae"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diagnostics, "MIN_CODEBOOK_USAGE", 2.0)
        train(VQVAETrainConfig(data=str(image_folder), out=str(out), preset="cpu-small", size=8, steps=3,
                               batch_size=4, precision="fp32", eval_every=1, eval_batches=1, n_images=2))
    return out


def test_the_page_is_self_contained_with_curves_and_warnings(warned_run, tmp_path):
    out = tmp_path / "page.html"
    assert ok("scripts/report.py", str(warned_run), "--out", str(out), in_process=True).strip() == f"report: {out}"
    text = out.read_text()
    page = Links(text)
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    curves = Image.open(io.BytesIO(base64.b64decode(page.images[f"learning curves of {warned_run}"].split(",")[1])))
    assert curves.width > 300 and curves.height > 200
    assert any(alt.startswith("test images") for alt in page.images)  # reconstructions.png
    warnings = [m for r in run_files.read_log(warned_run) for m in r.get("warnings", {}).values()]
    assert len(warnings) == 2 and all(html.escape(m) in text for m in warnings)
    assert "not evaluated: no vqvae results in" in text and "Final evaluation" in text


def test_evaluation_numbers_come_from_eval_json(warned_run, tmp_path):
    """As scripts/evaluate.py --json files them: {stage: {name: value}}, the run's stage in its own
    eval.json or its pipeline's, the stages no run shows (the samples') in the pipeline's section."""
    run = tmp_path / "pipeline" / "vqvae"
    shutil.copytree(warned_run, run)
    results = {"vqvae": {"psnr_db": 21.5, "images": 6}, "samples": {"cas": 0.25}, "top_prior": {"gap": 0.1}}
    (run.parent / "eval.json").write_text(json.dumps(results))
    text = write_report([run.parent], tmp_path / "report.html").read_text()
    pipeline, vqvae = text.split(f"<h2>Run {run}</h2>")
    assert "<th>psnr_db</th><td>21.5000</td>" in vqvae and "<th>images</th><td>6</td>" in vqvae
    assert "<th>samples / cas</th><td>0.2500</td>" in pipeline and "<th>top_prior / gap</th>" in pipeline
    assert "psnr_db" not in pipeline and "not evaluated" not in text
    (run.parent / "eval.json").write_text(json.dumps({"samples": {"cas": 0.25}}))
    (run / "eval.json").write_text(json.dumps({"vqvae": {"psnr_db": 20.0}}))
    text = write_report([run], tmp_path / "report.html").read_text()
    assert f"from {run / 'eval.json'}" in text and "<th>psnr_db</th><td>20.0000</td>" in text
    (run / "eval.json").unlink()
    text = write_report([run], tmp_path / "report.html").read_text()
    assert f"not evaluated: no vqvae results in {run / 'eval.json'} or {run.parent / 'eval.json'}" in text


def test_bad_input_is_one_line_and_writes_nothing(warned_run, tmp_path):
    result = run_script("scripts/report.py", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stderr == f"error: {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    shutil.copytree(warned_run, run)
    (run / "eval.json").write_text('{"vqvae": [1, 2]}')
    cases = [([tmp_path / "empty"], tmp_path / "r.html", "holds no run"),
             ([warned_run, run], tmp_path / "r.html", "is not a JSON object of stages"),
             ([warned_run], tmp_path / "no" / "r.pdf", "the file is written as .html, so its name must end in .html or .htm"),
             ([warned_run], tmp_path, "is a directory: give a file name")]
    for directories, out, message in cases:
        with pytest.raises(OSError if "run" in message else ValueError, match=message):
            write_report(directories, out)
    with pytest.raises(ValueError, match=f"^--curves {tmp_path / 'no' / 'c.jpg'}: the file is written as .png"):
        write_report([warned_run], tmp_path / "r.html", curves=tmp_path / "no" / "c.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"] and not (run / "report.html").exists()
    result = run_script("scripts/report.py", str(warned_run), "--out", str(tmp_path / "r.pdf"))
    assert result.returncode == 2 and result.stderr == (f"error: --out {tmp_path / 'r.pdf'}: the file is written as "
                                                        ".html, so its name must end in .html or .htm\n")
    assert write_report([warned_run], tmp_path / "new" / "r.htm", curves=tmp_path / "new" / "c.png").is_file()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["c.png", "r.htm"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(warned_run, tmp_path):
    write_report([warned_run], tmp_path / "page.html")
    shot = tmp_path / "page.png"
    assert ok("scripts/check_report.py", str(tmp_path / "page.html"), "--screenshot", str(shot)).startswith("screenshot:")
    assert Image.open(shot).size == (1200, 3000)
