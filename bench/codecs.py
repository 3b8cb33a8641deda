"""The `codecs` benchmark: a density model's bits/dim is a compression rate, so the pixel model is
held against the lossless codecs a user knows, on the same held-out crops.

The codecs: PNG at its maximum compression and WebP lossless at its best method (Pillow), as
bits per sub-pixel of the encoded files (headers included: a file is what a user stores). The
model: one run of the real trainer (scripts/train_pixelsnail.py) for the marks' minutes in total,
stopped at each mark by --max-minutes, resumed to the next with --resume (exact resume: one run,
not several), and evaluated in fp32 over the whole test split by scripts/evaluate.py at each
mark. Evaluation time does not count as training time.
"""

import io
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.common import ROOT, load_average, log, machine_info, markdown_table, text_table, write_results
from bench.precision import last_line_value, run_script
from pipelines.data import load_dataset
from prior import get_preset

CODECS = {
    "PNG (compress_level 9, optimize)": dict(format="PNG", compress_level=9, optimize=True),
    "WebP lossless (method 6)": dict(format="WEBP", lossless=True, quality=100, method=6),
}
FULL_MARKS = (2.0, 5.0, 10.0)
QUICK_MARKS = (0.1, 0.2)


def test_images(data, size):
    """The test split of `data` as uint8 (N, 3, S, S), as the model is evaluated on it."""
    dataset = load_dataset(data, "test", size)
    return [dataset[i][0] for i in range(len(dataset))]


def codec_bits_per_subpixel(images, options):
    """8 x (bytes of all encoded files) / (sub-pixels of all images)."""
    total_bytes = 0
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, **options)
        total_bytes += buffer.tell()
    return 8 * total_bytes / sum(image.numel() for image in images)


def model_curve(run_dir, preset, train_data, eval_data, marks, seed):
    """[{minutes, seconds, test bits/dim}] of one training run stopped and evaluated at each mark."""
    curve, done = [], 0.0
    for mark in marks:
        log(f"training {preset} to minute {mark:g}")
        start = time.perf_counter()
        run_script("scripts/train_pixelsnail.py", "--out", str(run_dir), "--preset", preset, "--data", train_data,
                   "--seed", str(seed), "--steps", str(10**9), "--max-minutes", repr(mark - done),
                   "--eval-every", str(10**9), "--checkpoint-every", str(10**9), "--n-samples", "0",
                   *(["--resume"] if done else []))
        seconds = time.perf_counter() - start
        done = mark
        output = run_script("scripts/evaluate.py", "--ckpt", str(run_dir), "--data", eval_data, "--precision", "fp32")
        curve.append({"minutes": mark, "session_seconds": seconds, "test_bits_per_dim": last_line_value(output, "test bits/dim: ")})
        log(f"  minute {mark:g}: test bits/dim {curve[-1]['test_bits_per_dim']:.4f}")
    return curve


def run(args):
    """Scores the held-out crops with PNG and WebP lossless, then trains the pixel preset for
    2, 5 and 10 minutes (one run, evaluated at each mark) and puts its test bits/dim beside them;
    writes codecs.json, codecs.md and codecs.png (bits/dim against training minutes) to --out.

    python scripts/bench.py codecs                    # about 12 minutes on 2 idle cores
    python scripts/bench.py codecs --no-model         # the codecs alone, seconds
    python scripts/bench.py codecs --eval-data ~/photos   # the same, on photos you bring
    """
    marks = QUICK_MARKS if args.quick else FULL_MARKS
    preset = args.preset or ("tiny" if args.quick else "cpu-small")
    size = get_preset(preset).model.shape[0]  # the model's images: the trainer takes the size from it
    images = test_images(args.eval_data, size)
    log(f"{len(images)} test crops of {args.eval_data} at {size}x{size}")
    results = {**machine_info(), "benchmark": "codecs", "eval_data": args.eval_data, "size": size,
               "n_images": len(images),
               "codecs": {name: codec_bits_per_subpixel(images, options) for name, options in CODECS.items()}}
    for name, bits in results["codecs"].items():
        log(f"{name}: {bits:.3f} bits per sub-pixel")
    if not args.no_model:
        with tempfile.TemporaryDirectory() as tmp:
            results["model"] = {"preset": preset, "train_data": args.train_data, "seed": args.seed,
                                "curve": model_curve(Path(tmp) / "run", preset, args.train_data, args.eval_data,
                                                     marks, args.seed)}
    results["load_average_after"] = load_average()
    out = Path(args.out)
    write_results(results, out, "codecs", format_markdown(results))
    if "model" in results:
        plot(results, out / "codecs.png")
    print("\n".join(["", *text_table(HEADER, rows(results)), ""]))


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="tiny preset, 6 and 12 seconds: a smoke run")
    parser.add_argument("--no-model", action="store_true", help="score the codecs only")
    parser.add_argument("--preset", help="the pixel preset to train (default cpu-small)")
    parser.add_argument("--train-data", default="builtin", help="the training data, as the trainer takes it")
    parser.add_argument("--eval-data", default="builtin",
                        help="whose test split the model and the codecs score (default builtin: held-out photos)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="directory for codecs.json, codecs.md and codecs.png (default bench/results)")


# -- output -----------------------------------------------------------------------------------


HEADER = ("coder", "bits per sub-pixel (held-out crops)")


def rows(results):
    table = [[name, f"{bits:.3f}"] for name, bits in results["codecs"].items()]
    for point in results.get("model", {}).get("curve", []):
        table.append([f"PixelSNAIL {results['model']['preset']} after {point['minutes']:g} min of training",
                      f"{point['test_bits_per_dim']:.3f}"])
    return table


def format_markdown(results):
    lines = [f"# Lossless codecs against the pixel model, on {results['n_images']} held-out "
             f"{results['size']}x{results['size']} crops of {results['eval_data']}", "",
             f"`{results['command']}`", "", *markdown_table(HEADER, rows(results)), "",
             f"- {results['cpu']}, {results['threads']} threads, torch {results['torch']}, {results['date']}",
             f"- load average before/after: {results['load_average_before']} / {results['load_average_after']}",
             "- codecs: the encoded files' bytes x 8 / sub-pixels; model: exact test bits/dim (EMA weights, fp32)", ""]
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["model"]["curve"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([p["minutes"] for p in curve], [p["test_bits_per_dim"] for p in curve], "o-",
              label=f"PixelSNAIL {results['model']['preset']}")
    for (name, bits), style in zip(results["codecs"].items(), ("--", ":")):
        axes.axhline(bits, linestyle=style, color="grey", label=name)
    axes.set_xlabel("training minutes (2 CPU cores)")
    axes.set_ylabel("bits per sub-pixel, held-out crops")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
