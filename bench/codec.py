"""The `codec` benchmark: the pixel model as a real lossless codec (pipelines.infer.codec, as
scripts/compress.py runs it) on whole photos it never saw, beside PNG, WebP lossless and JPEG-XL
lossless: bits per sub-pixel from the files' sizes, headers included, and encode and decode seconds
per megapixel of each.

Photos: the built-in test photos (cut into the test crops only, never trained on) and matplotlib's
sample photo of Grace Hopper (the codecs benchmark's other photo), whole or centre-cropped to
--crop; --photos takes others. Models: cpu-small trained by the real trainer (scripts/
train_pixelsnail.py, its defaults) to each mark of --marks, one run stopped and resumed, or the
checkpoints --models names. Each model codes every photo twice: with the codec's layout (context
rows; this is the file compress.py writes, decoded and checked bit for bit) and with independent
tiles (no context), which measures what the context is worth.
"""

import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import (Report, add_common_arguments, add_quick_argument, apply_defaults, default_other_photos, log,
                          machine_info, machine_lines, pyplot, recorded_path, results_record, train_pixel_run)
from pipelines.cli import user_path
from pipelines.data.datasets import builtin_photo, to_rgb8
from pipelines.data.holdout import BUILTIN_TEST_PHOTOS
from pipelines.eval.codecs import CODECS
from pipelines.infer.codec import decode_image, encode_image, load_codec_model
from pipelines.store.run_files import read_log

FULL = dict(preset="cpu-small", marks=(10.0, 60.0), crop=0)  # crop 0: whole photos
QUICK = dict(preset="tiny", marks=(0.1,), crop=24)  # seconds of training, 24x24 crops
JPEG_XL = "JPEG-XL lossless (effort 9)"


# -- photos and the usual codecs ----------------------------------------------------------------


def photos(paths, crop):
    """{name: uint8 (3, H, W)}: the built-in test photos and `paths` (default: the other photo),
    centre-cropped to crop x crop where given."""
    arrays = {name: builtin_photo(name) for name in BUILTIN_TEST_PHOTOS}
    for path in paths or default_other_photos():
        with Image.open(path) as image:
            arrays[Path(path).stem] = np.asarray(to_rgb8(image))
    images = {}
    for name, array in arrays.items():
        if crop:
            top, left = max(0, (array.shape[0] - crop) // 2), max(0, (array.shape[1] - crop) // 2)
            array = array[top : top + crop, left : left + crop]
        images[name] = torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()  # a writable copy
    return images


def pillow_codec(options):
    """(encode, decode) of a Pillow format: uint8 (H, W, 3) <-> bytes."""

    def encode(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, **options)
        return buffer.getvalue()

    return encode, lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg_xl():
    import imagecodecs  # the bench extra: pip install -e .[bench]

    return (lambda array: imagecodecs.jpegxl_encode(array, lossless=True, effort=9)), imagecodecs.jpegxl_decode


def usual_codecs():
    return {**{name: pillow_codec(options) for name, options in CODECS.items()}, JPEG_XL: jpeg_xl()}


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def score_codec(encode, decode, images):
    """{bytes: {photo: n}, encode_seconds, decode_seconds} of one codec over the photos, each checked lossless."""
    sizes, encode_seconds, decode_seconds = {}, 0.0, 0.0
    for name, image in images.items():
        array = image.permute(1, 2, 0).numpy()
        data, seconds = timed(encode, array)
        encode_seconds += seconds
        decoded, seconds = timed(decode, data)
        decode_seconds += seconds
        if not np.array_equal(np.asarray(decoded), array):
            raise RuntimeError(f"a lossless codec changed {name}")
        sizes[name] = len(data)
    return {"bytes": sizes, "encode_seconds": encode_seconds, "decode_seconds": decode_seconds}


# -- the model's codec --------------------------------------------------------------------------


def score_model(path, images, threads):
    """The codec with `path`'s model, in its layout (encoded, decoded, checked) and with independent
    tiles (encoded): {layout: {bytes, ideal_bytes, header_bytes, encode_seconds[, decode_seconds]}}."""
    codec_model = load_codec_model(path)
    results = {}
    for layout, context_rows in (("context", None), ("independent", 0)):
        record = {"bytes": {}, "ideal_bytes": {}, "header_bytes": {}, "encode_seconds": 0.0}
        if layout == "context":
            record["decode_seconds"] = 0.0
        for name, image in images.items():
            coded = encode_image(codec_model, image, context_rows=context_rows, threads=threads)
            record["encode_seconds"] += coded.seconds
            record["bytes"][name], record["header_bytes"][name] = len(coded.data), coded.header.size
            record["ideal_bytes"][name] = coded.ideal_bits / 8
            if layout == "context":
                decoded, seconds = timed(decode_image, codec_model, coded.data, name)
                record["decode_seconds"] += seconds
                if not torch.equal(decoded, image):
                    raise RuntimeError(f"the codec did not give {name} back")
            log(f"  {layout}: {name} {8 * len(coded.data) / image.numel():.3f} bits/sub-pixel, "
                f"{coded.seconds:.1f} s to encode")
        results[layout] = record
    return results


def train_models(work, args):
    """Trains cpu-small (or --preset) to each mark, one run resumed; -> [(label, checkpoint, steps)]."""
    run_dir, done, models = work / "run", 0.0, []
    for mark in args.marks:
        log(f"training to minute {mark:g}")
        train_pixel_run(run_dir, "--data", args.train_data, "--seed", str(args.seed), "--preset", args.preset,
                        "--steps", str(10**9), "--max-minutes", repr(mark - done), resume=bool(done))
        done = mark
        snapshot = work / f"model-{mark:g}min.safetensors"
        shutil.copyfile(run_dir / "model.safetensors", snapshot)
        models.append((f"{args.preset}, {mark:g} min", snapshot, read_log(run_dir)[-1]["step"]))
    return models


def run(args):
    """Codes whole held-out photos with the pixel model's codec (trained 10 and 60 minutes on 2 CPU
    cores by default) and with PNG, WebP lossless and JPEG-XL lossless; writes codec.json, codec.md
    and codec.png (bits per sub-pixel of each photo and coder) to --out.

    python -m bench codec                     # about 90 minutes on 2 idle cores (70 of training)
    python -m bench codec --models a.safetensors b.safetensors   # models already trained
    python -m bench codec --quick             # the tiny preset, 24x24 crops: a smoke run
    """
    apply_defaults(args, QUICK if args.quick else FULL)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    images = photos(args.photos, args.crop)
    log("photos: " + ", ".join(f"{name} {image.shape[2]}x{image.shape[1]}" for name, image in images.items()))
    coders = {}
    for name, (encode, decode) in usual_codecs().items():
        coders[name] = score_codec(encode, decode, images)
        log(f"{name}: {8 * sum(coders[name]['bytes'].values()) / sum(i.numel() for i in images.values()):.3f} "
            "bits/sub-pixel")
    with tempfile.TemporaryDirectory() as tmp:
        if args.models:
            models = [(Path(path).name, path, None) for path in args.models]
        else:
            models = train_models(Path(tmp), args)
        model_results = []
        for label, path, steps in models:
            log(f"model {label}")
            model_results.append({"label": label, "steps": steps, **score_model(path, images, args.threads)})
    config = {"photos": {name: list(image.shape[1:]) for name, image in images.items()}, "crop": args.crop,
              "preset": args.preset, "marks": list(args.marks), "train_data": recorded_path(args.train_data),
              "models": [recorded_path(path) for path in args.models or []], "seed": args.seed}
    results = results_record("codec", info, args.quick, config, coders=coders, models=model_results)
    REPORT.publish(results, args.out)
    plot(results, Path(args.out) / "codec.png")


def add_arguments(parser):
    add_quick_argument(parser, QUICK)
    parser.add_argument("--preset", help="the pixel preset trained (default cpu-small)")
    parser.add_argument("--marks", type=float, nargs="+", help="training minutes of each model (default 10 60)")
    parser.add_argument("--models", nargs="+", type=user_path, metavar="CKPT",
                        help="code with these pixel models instead of training")
    parser.add_argument("--train-data", default="builtin", help="the training data, as the trainer takes it")
    parser.add_argument("--photos", nargs="+", type=user_path, metavar="PHOTO",
                        help="other photos beside the built-in test photos (default: matplotlib's grace_hopper.jpg)")
    parser.add_argument("--crop", type=int, help="centre-crop every photo to this square (default: whole photos)")
    add_common_arguments(parser, "codec", "the training run's seed (default 0)")


# -- output -----------------------------------------------------------------------------------


def bits(record, subpixels):
    """{photo: bits per sub-pixel, 'all': over every photo} from a record's file sizes."""
    per_photo = {name: 8 * record["bytes"][name] / count for name, count in subpixels.items()}
    return {**per_photo, "all": 8 * sum(record["bytes"].values()) / sum(subpixels.values())}


def photo_subpixels(results):
    """{photo: its sub-pixels} of the photos the results hold."""
    return {name: 3 * height * width for name, (height, width) in results["config"]["photos"].items()}


def coder_rows(results):
    """[(coder name, record)] in the table's order: the usual codecs, then each model's two layouts."""
    rows = list(results["coders"].items())
    for model in results["models"]:
        steps = f", {model['steps']} steps" if model["steps"] is not None else ""
        rows.append((f"PixelSNAIL {model['label']}{steps}", model["context"]))
        rows.append((f"PixelSNAIL {model['label']}, independent tiles", model["independent"]))
    return rows


def table(results):
    subpixels = photo_subpixels(results)
    megapixels = sum(subpixels.values()) / 3e6
    header = ("coder", *subpixels, "all", "encode s/MP", "decode s/MP")
    rows = []
    for name, record in coder_rows(results):
        per_photo = bits(record, subpixels)
        decode = f"{record['decode_seconds'] / megapixels:.2f}" if "decode_seconds" in record else "-"
        rows.append((name, *(f"{per_photo[key]:.3f}" for key in (*subpixels, "all")),
                     f"{record['encode_seconds'] / megapixels:.2f}", decode))
    notes = [
        "bits per sub-pixel of the files each coder writes, headers included; seconds per megapixel of encoding "
        "and decoding all photos, one at a time, on this machine",
        "photos: " + ", ".join(f"{name} {shape[1]}x{shape[0]}" for name, shape in results["config"]["photos"].items())
        + " (the built-in test photos, never trained on, and another photo)",
        "PixelSNAIL: pipelines.infer.codec as scripts/compress.py writes it, decoded and checked bit for bit; "
        "independent tiles: the same model without context rows, encoded only",
    ]
    for model in results["models"]:
        record = model["context"]
        excess = max((record["bytes"][name] - record["header_bytes"][name]) / record["ideal_bytes"][name] - 1
                     for name in subpixels)
        notes.append(f"{model['label']}: payload at most {100 * excess:.2f}% over the ideal code length; headers "
                     + ", ".join(f"{record['header_bytes'][name]} bytes" for name in subpixels))
    return header, rows, notes + machine_lines(results)


REPORT = Report("codec", "The pixel model as a lossless codec against PNG, WebP and JPEG-XL on whole photos", table,
                quick="the tiny preset trained for seconds, 24x24 crops")


def plot(results, path):
    plt = pyplot()
    subpixels = photo_subpixels(results)
    rows = coder_rows(results)
    names = [*subpixels, "all"]
    figure, axes = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(rows)
    for k, (name, record) in enumerate(rows):
        values = bits(record, subpixels)
        axes.bar(np.arange(len(names)) + k * width, [values[key] for key in names], width, label=name)
    axes.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    axes.set_ylabel("bits per sub-pixel")
    axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
