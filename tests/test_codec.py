"""The lossless codec (pipelines.infer.codec, scripts/compress.py and decompress.py) on a tiny random
pixel model: bit-for-bit round trips at any size and in both layouts, the code length against the
model's, the same file whatever else is coded and whatever the thread count, and one-line refusals
that write nothing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench.codec
from launch import ok, run_in_process
from pipelines.data.datasets import to_model_range
from pipelines.infer.codec import CodecModel, band_tops, decode_image, encode_image, passes
from pipelines.store.checkpoint import PIXELSNAIL_KIND, save_checkpoint
from pipelines.store.codec_file import FIXED
from prior import PixelSNAIL, get_preset, mixture

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {"independent tiles": 0, "context rows": 3}  # context_rows of the tiny model's 8-row grid


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return PixelSNAIL(get_preset("tiny").model).eval()


@pytest.fixture(scope="module")
def codec_model():
    return CodecModel(tiny_model(), "ab" * 32)


def photo_like(height, width, seed=0):
    """uint8 (3, H, W): smooth gradients and noise, something a model can predict in part."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, size=(3, 1, 1)) * (0.5 + 0.5 * np.sin(x / 7 + y / 11))
    return torch.from_numpy((base + rng.normal(0, 6, size=(3, height, width))).clip(0, 255).astype(np.uint8))


IMAGES = {
    "1x1": lambda: photo_like(1, 1),
    "31x33": lambda: photo_like(31, 33),
    "75x61": lambda: photo_like(75, 61),
    "multiple of the tile": lambda: photo_like(16, 24),
    "all black": lambda: torch.zeros(3, 13, 21, dtype=torch.uint8),
    "noise": lambda: torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 19, 17), dtype=np.uint8)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", IMAGES)
def test_round_trip_is_bit_for_bit(codec_model, name, layout):
    image = IMAGES[name]()
    coded = encode_image(codec_model, image, context_rows=LAYOUTS[layout])
    assert torch.equal(decode_image(codec_model, coded.data, "x.psnail"), image)


@pytest.mark.parametrize("context_rows", [0, 3, 7])
@pytest.mark.parametrize("size", [(1, 1), (8, 8), (31, 33), (75, 61), (9, 100)])
def test_tiles_cover_every_pixel_once_and_windows_read_only_what_is_coded(size, context_rows):
    height, width = size
    grid = (8, 8)
    coded_when = torch.full((height, width), -1)
    for k, windows in enumerate(passes(height, width, grid, context_rows, bands=3 if height > 24 else 1)):
        for window in windows:
            rows, columns = window.tile()
            assert (coded_when[rows, columns] == -1).all()
            known = coded_when[window.top : window.top + window.first_new, columns]
            assert ((known >= 0) & (known < k)).all()  # context: coded in an earlier pass
            assert window.rows <= grid[0] and window.first_new < window.rows and window.columns <= grid[1]
            coded_when[rows, columns] = k
    assert (coded_when >= 0).all()
    assert band_tops(0, 20, 8, 3) == [(0, 0), (5, 3), (10, 3), (12, 6)]  # the last window moves up: more context


def test_the_codec_codes_with_the_models_own_likelihood(codec_model):
    """The ideal code length the encoder counts (the cached step, the channels one by one) is the
    full network's bits of each tile, each seen in its window as the layout builds it."""
    image = photo_like(20, 19)
    model, grid = codec_model.model, codec_model.model.config.shape
    for context_rows in LAYOUTS.values():
        coded = encode_image(codec_model, image, context_rows=context_rows)
        bits = 0.0
        for windows in passes(20, 19, grid, context_rows, coded.header.bands):
            for w in windows:
                pixels = image[:, w.top : w.top + w.rows, w.left : w.left + w.columns].float()
                pixels = F.pad(pixels[None], (0, grid[1] - w.columns, 0, 0), mode="replicate")  # the rows' last pixel
                x = to_model_range(F.pad(pixels, (0, 0, 0, grid[0] - w.rows)))  # rows past the band: never read
                bits_map = model.output_bits_map(x, model(x))[0]
                bits += bits_map[w.first_new : w.rows, : w.columns].double().sum().item()
        assert coded.ideal_bits == pytest.approx(bits, rel=1e-4)


def test_the_three_channel_distributions_multiply_to_the_likelihood():
    torch.manual_seed(0)
    params = torch.randn(64, 50) * 2  # 5 components
    x = torch.randint(0, 256, (64, 3))
    log_joint, factors = torch.zeros(64), mixture.PixelFactors(params)
    for channel in range(3):
        probabilities = factors.distribution(to_model_range(x.masked_fill(torch.arange(3) >= channel, 0)))
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(64))
        log_joint += probabilities.gather(1, x[:, channel : channel + 1])[:, 0].log()
        factors.observe(x[:, channel])
    expected = mixture.log_prob(to_model_range(x)[:, :, None, None], params[:, :, None, None])[:, 0, 0]
    assert torch.allclose(log_joint, expected, atol=1e-4)


def test_payload_is_within_one_percent_of_the_ideal_code_length(codec_model):
    coded = encode_image(codec_model, photo_like(40, 45), context_rows=3)
    assert len(coded.data) == coded.header.size + coded.payload_bytes
    assert coded.header.size == FIXED.size + 1 + len(torch.__version__) + 4 * len(coded.header.checksums)
    assert coded.ideal_bits / 8 <= coded.payload_bytes <= 1.01 * coded.ideal_bits / 8


def test_decoding_runs_the_files_thread_count_whatever_the_callers(codec_model):
    image = photo_like(12, 10)
    coded = encode_image(codec_model, image, threads=1)
    assert coded.header.threads == 1
    torch.set_num_threads(2)  # the one_thread fixture puts 1 back after the module
    try:
        assert torch.equal(decode_image(codec_model, coded.data, "x.psnail"), image)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_another_model_or_a_flipped_byte_fails_in_one_line(codec_model):
    coded = encode_image(codec_model, photo_like(20, 20), context_rows=3)
    other = CodecModel(tiny_model(seed=1), "cd" * 32)
    with pytest.raises(ValueError, match="coded with another model"):
        decode_image(other, coded.data, "x.psnail")
    same_hash = CodecModel(tiny_model(seed=1), codec_model.sha256)  # as if the floats differed
    first_bad = (r"x.psnail: (tile \d+ \(rows \d+\.\.\d+, columns \d+\.\.\d+\)"
                 r"|the payload does not decode in tiles \d+\.\.\d+)")
    with pytest.raises(ValueError, match=first_bad):
        decode_image(same_hash, coded.data, "x.psnail")
    flipped = bytearray(coded.data)
    flipped[coded.header.size + 5] ^= 0x10
    with pytest.raises(ValueError, match=first_bad):
        decode_image(codec_model, bytes(flipped), "x.psnail")


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:42] + (10**6).to_bytes(4, "little") + data[46:], "damaged header: 9 checksums for a 1000000x"),
    (lambda data: data[:8] + (9).to_bytes(2, "little") + data[10:], "format version 9, newer than this code"),
    (lambda data: data + b"\0", "longer than its header says"),
    (lambda data: data[:60], "truncated"),
])
def test_a_damaged_header_is_refused_in_one_line(codec_model, damage, message):
    data = encode_image(codec_model, photo_like(20, 20), context_rows=0).data  # 9 tiles
    with pytest.raises(ValueError, match=message):
        decode_image(codec_model, damage(data), "x.psnail")


# -- the scripts -------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    """A checkpoint of the tiny model, a second one, and a folder of three small photos."""
    for name, seed in (("model.safetensors", 0), ("other.safetensors", 1)):
        model = tiny_model(seed)
        save_checkpoint(tmp_path / name, model.state_dict(), PIXELSNAIL_KIND, model.config, step=0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, (height, width) in enumerate([(11, 9), (8, 13), (5, 5)]):
        Image.fromarray(photo_like(height, width, seed=k).permute(1, 2, 0).numpy()).save(photos / f"p{k}.png")
    return tmp_path


def compress(files, *args):
    return run_in_process("scripts/compress.py", "--ckpt", files / "model.safetensors", *args)


def decompress(files, *args, ckpt="model.safetensors"):
    return run_in_process("scripts/decompress.py", "--ckpt", files / ckpt, *args)


def one_line_error(result, *fragments):
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert all(fragment in result.stderr for fragment in fragments), result.stderr


def test_scripts_round_trip_a_folder_and_a_file_alone_codes_as_in_a_batch(files):
    out = ok("scripts/compress.py", "--ckpt", files / "model.safetensors", "--out", files / "all", files / "photos",
             in_process=True)
    assert "over the ideal code length" in out and out.strip().splitlines()[-1].startswith("compressed 3 images")
    ok("scripts/compress.py", "--ckpt", files / "model.safetensors", "--out", files / "alone",
       files / "photos" / "p1.png", in_process=True)
    assert (files / "alone" / "p1.psnail").read_bytes() == (files / "all" / "p1.psnail").read_bytes()
    ok("scripts/decompress.py", "--ckpt", files / "model.safetensors", "--out", files / "back", files / "all",
       in_process=True)
    for k in range(3):
        assert np.array_equal(np.asarray(Image.open(files / "back" / f"p{k}.png")),
                              np.asarray(Image.open(files / "photos" / f"p{k}.png")))


def test_scripts_refuse_bad_input_in_one_line_and_write_nothing(files):
    photo = files / "photos" / "p0.png"
    assert compress(files, "--out", files / "c", photo).returncode == 0
    coded = (files / "c" / "p0.psnail").read_bytes()
    bad = files / "bad"
    bad.mkdir()
    (bad / "truncated.psnail").write_bytes(coded[:-3])
    (bad / "png.psnail").write_bytes(photo.read_bytes())
    flipped = bytearray(coded)
    flipped[-6] ^= 0x01
    (bad / "flipped.psnail").write_bytes(bytes(flipped))
    out = files / "out"
    one_line_error(decompress(files, "--out", out, bad / "truncated.psnail"), "truncated.psnail is truncated")
    one_line_error(decompress(files, "--out", out, bad / "png.psnail"), "png.psnail is not a .psnail file")
    one_line_error(decompress(files, "--out", out, bad / "flipped.psnail"), "flipped.psnail: ")
    one_line_error(decompress(files, "--out", out, files / "c", ckpt="other.safetensors"), "coded with another model")
    one_line_error(decompress(files, "--out", out, files / "c", ckpt="missing"), "checkpoint not found", "missing")
    assert not out.exists() or list(out.iterdir()) == []
    one_line_error(compress(files, "--out", files / "c", photo), "p0.psnail exists", "pass --overwrite")
    assert compress(files, "--out", files / "c", "--overwrite", photo).returncode == 0
    one_line_error(compress(files, "--out", photo / "sub", photo), "--out", "is a file, not a folder")
    one_line_error(compress(files, "--out", files / "d", files / "nothing.png"), "image not found")


def test_a_process_that_flushes_denormals_is_refused_on_both_sides_in_one_line(codec_model, files):
    """A flushed denormal changes a tail's factors, so a file decodes only where they are kept (as every
    file was coded)."""
    coded = encode_image(codec_model, photo_like(9, 7))
    torch.set_flush_denormal(True)
    try:
        with pytest.raises(ValueError, match="flushes them to zero"):
            encode_image(codec_model, photo_like(9, 7))
        with pytest.raises(ValueError, match="flushes them to zero"):
            decode_image(codec_model, coded.data, "x.psnail")
        one_line_error(compress(files, "--out", files / "c", files / "photos"), "flushes them to zero")
    finally:
        torch.set_flush_denormal(False)
    assert not (files / "c").exists() or list((files / "c").iterdir()) == []


def test_the_codec_refuses_a_process_whose_other_threads_flush_denormals(files):
    """Its own thread keeps them, the intra-op threads (a training script's) do not: refused too."""
    code = ("import runpy, sys, torch; from pipelines.device import flush_denormals_in_thread_pool; "
            "torch.set_num_threads(2); flush_denormals_in_thread_pool(); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "scripts/compress.py", "--ckpt", files / "model.safetensors",
                             "--threads", "2", "--out", files / "c", files / "photos"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    one_line_error(result, "flushes them to zero")
    assert not (files / "c").exists() or list((files / "c").iterdir()) == []


def test_images_that_are_not_8_bit_rgb_are_refused_unless_converted(files):
    rgba = files / "rgba.png"
    Image.fromarray(np.tile(np.array([10, 20, 30, 255], dtype=np.uint8), (4, 5, 1))).save(rgba)  # opaque
    one_line_error(compress(files, "--out", files / "c", rgba), "is a RGBA image", "--convert")
    assert not (files / "c" / "rgba.psnail").exists()
    assert compress(files, "--out", files / "c", "--convert", rgba).returncode == 0
    assert decompress(files, "--out", files / "back", files / "c").returncode == 0
    assert np.array_equal(np.asarray(Image.open(files / "back" / "rgba.png")), np.tile([10, 20, 30], (4, 5, 1)))


def test_the_benchmark_codes_every_photo_with_every_coder_and_checks_it(files, tmp_path):
    from bench.__main__ import main as bench_main

    bench_main(["codec", "--quick", "--crop", "12", "--models", str(files / "model.safetensors"),
                "--out", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "codec.json").read_text())
    assert set(results["coders"]) == {"PNG (compress_level 9, optimize)", "WebP lossless (method 6)",
                                      "JPEG-XL lossless (effort 9)"}
    (model,) = results["models"]
    for layout in ("context", "independent"):
        assert sorted(model[layout]["bytes"]) == sorted(results["config"]["photos"]) == ["chelsea", "coffee",
                                                                                         "grace_hopper"]
    assert (tmp_path / "results" / "codec.md").read_text() == bench.codec.REPORT.markdown(results)
    assert (tmp_path / "results" / "codec.png").stat().st_size > 0
