"""The `extract` benchmark: code extraction through scripts/extract_codes.py itself, fp32 vs the
fast path (bf16 autocast; both channels_last), and the codes bf16 changes on a trained VQ-VAE."""

import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench.common import (VQVAE_QUICK_MODEL, OtherCpuUse, Report, add_common_arguments, apply_defaults, channels_last,
                          load_average, log, machine_info, machine_lines, random_pixels, recorded_path, run_command,
                          vqvae_extract)
from pipelines.data.datasets import load_dataset, to_model_range
from pipelines.store.checkpoint import load_vqvae, save_checkpoint
from pipelines.store.codes import CodeDataset
from vqvae import VQVAE2, VQVAE2Config

PRECISIONS = ("fp32", "bf16")
QUICK_DEFAULTS = dict(size=32, images=8, batch_size=4, rounds=1, trained_vqvae=None)
FULL_DEFAULTS = dict(size=256, images=128, batch_size=32, rounds=3, trained_vqvae="runs/demo/vqvae")


def write_random_images(folder, n, size, seed):
    """n random RGB images of side `size` as PNG files (noise: the encoder's cost does not depend on content)."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for k in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"{k:05d}.png")


def run_extraction(vqvae, data, out, precision, batch_size):
    """Runs extract_codes.py; -> (images encoded, seconds the script reports for its extraction loop)."""
    command = [sys.executable, "scripts/extract_codes.py", "--vqvae", str(vqvae), "--data", str(data), "--out",
               str(out), "--precision", precision, "--batch-size", str(batch_size), "--device", "cpu"]
    line = next(line for line in run_command(command).stdout.splitlines() if line.startswith("encoded "))
    words = line.split()  # encoded N images in T s (R images/s)
    return int(words[1]), float(words[4])


def time_model_only(model, images, batch_size, precision):
    """Seconds of the vqvae benchmark's in-process extraction (model.encode alone, channels_last, the
    variant it reports) over `images` in batches of `batch_size`."""
    start = time.perf_counter()
    for batch in images.split(batch_size):
        vqvae_extract(*channels_last(model, batch), precision)
    return time.perf_counter() - start


def time_extraction(vqvae, data, work, batch_size, rounds, model, images):
    """images/s of each precision through the script, and of the model alone on as many images
    (`images`, in [-1, 1]), rounds interleaved with alternating order."""
    timings = {precision: {"images_per_s": [], "model_only_images_per_s": [], "other_cpu_use": []}
               for precision in PRECISIONS}
    for round_index in range(rounds):
        for precision in PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]:
            with OtherCpuUse(include_children=True) as contention:
                n, seconds = run_extraction(vqvae, data, work / f"{precision}-{round_index}.lmdb", precision,
                                            batch_size)
                model_seconds = time_model_only(model, images[:n], batch_size, precision)
            timing = timings[precision]
            timing["images_per_s"].append(n / seconds)
            timing["model_only_images_per_s"].append(n / model_seconds)
            timing["other_cpu_use"].append(contention.fraction)
            log(f"  round {round_index + 1}/{rounds} {precision}: {n / seconds:.1f} images/s through the script, "
                f"{n / model_seconds:.1f} model alone (other CPU {contention.fraction:.0%})")
    for timing in timings.values():
        timing["median_images_per_s"] = statistics.median(timing["images_per_s"])
        timing["median_model_only_images_per_s"] = statistics.median(timing["model_only_images_per_s"])
    paired = [b / f for f, b in zip(timings["fp32"]["images_per_s"], timings["bf16"]["images_per_s"])]
    return {**timings, "bf16_speedup_paired_median": statistics.median(paired), "images": n}


def compare_codes(fp32_db, bf16_db, vqvae_path, data, size):
    """Per level, the fraction of codes (and of images with any code) bf16 chose differently from
    fp32; and the reconstruction MSE (images in [-1, 1]) decoding each set of codes in fp32."""
    reference, fast = CodeDataset(fp32_db), CodeDataset(bf16_db)
    images = load_dataset(data, "train", size)
    model = load_vqvae(vqvae_path)[0]
    changed = {"top": [0, 0, 0], "bottom": [0, 0, 0]}  # codes changed, images with a change, codes
    squared_error = {"fp32": 0.0, "bf16": 0.0}
    loaders = zip(DataLoader(reference, batch_size=256), DataLoader(fast, batch_size=256),
                  DataLoader(images, batch_size=256))
    with torch.no_grad():
        for (top_a, bottom_a, _), (top_b, bottom_b, _), (pixels, _) in loaders:
            for level, a, b in (("top", top_a, top_b), ("bottom", bottom_a, bottom_b)):
                differs = a != b
                changed[level][0] += int(differs.sum())
                changed[level][1] += int(differs.flatten(1).any(1).sum())
                changed[level][2] += differs.numel()
            x = to_model_range(pixels)
            for name, top, bottom in (("fp32", top_a, bottom_a), ("bf16", top_b, bottom_b)):
                squared_error[name] += float((model.decode_codes(top, bottom) - x).square().mean(dim=(1, 2, 3)).sum())
    n = len(reference)
    return {
        "images": n,
        **{level: {"codes_changed": codes / total, "images_with_a_change": with_change / n}
           for level, (codes, with_change, total) in changed.items()},
        "reconstruction_mse": {name: value / n for name, value in squared_error.items()},
    }


def run(args):
    """Code extraction through scripts/extract_codes.py itself, on the CPU, in fp32 and in bf16 (the
    fast path; both channels_last), interleaved with alternating order; the images/s is the one the
    script prints for its extraction loop (data loading, encoding and writing; not its start-up).
      speed      the paper's VQ-VAE-2 (VQVAE2Config(), random weights) on 128 random 256x256 images,
                 batch 32, three rounds; median images/s and the paired bf16 / fp32 ratio
      codes      a trained VQ-VAE (--trained-vqvae, default runs/demo/vqvae, which `make demo` writes)
                 extracted in fp32 and in bf16 on its own data (--data, default builtin): per level the
                 fraction of codes bf16 chose differently, the fraction of images with any change, and
                 the reconstruction MSE of each set of codes decoded in fp32
    Writes extract.json and extract.md to --out. --quick: a tiny random model on 8 images of 32x32,
    and the codes compared on those; the numbers mean nothing."""
    apply_defaults(args, QUICK_DEFAULTS if args.quick else FULL_DEFAULTS)
    config = VQVAE_QUICK_MODEL if args.quick else VQVAE2Config()
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_random_images(work / "images", args.images, args.size, args.seed)
        torch.manual_seed(args.seed)
        model = VQVAE2(config)
        save_checkpoint(work / "vqvae" / "model.safetensors", model.state_dict(), "vqvae2", config,
                        image_size=args.size)
        log(f"extraction, {model.num_parameters() / 1e6:.2f}M parameters, {args.images} images of "
            f"{args.size}x{args.size}, batch {args.batch_size}, {args.rounds} round(s) of fp32 and bf16")
        pixels = random_pixels(args.images, (args.size, args.size), torch.Generator().manual_seed(args.seed))
        speed = time_extraction(work / "vqvae", work / "images", work, args.batch_size, args.rounds, model.eval(),
                                pixels)
        if args.trained_vqvae is None:
            trained, data, size = work / "vqvae", work / "images", args.size
            fp32_db, bf16_db = work / "fp32-0.lmdb", work / "bf16-0.lmdb"
        else:
            trained, data = Path(args.trained_vqvae), args.data
            size = trained_image_size(trained)
            log(f"codes of the trained VQ-VAE {trained} on {data} ({size}x{size}), fp32 and bf16")
            fp32_db, bf16_db = work / "trained-fp32.lmdb", work / "trained-bf16.lmdb"
            for precision, db in (("fp32", fp32_db), ("bf16", bf16_db)):
                run_extraction(trained, data, db, precision, 256)
        codes = compare_codes(fp32_db, bf16_db, trained, data, size)
    results = {
        "benchmark": "extract",
        **info,
        "load_average_after": load_average(),
        "quick": args.quick,
        "config": {"model": asdict(config), "paper_model": config == VQVAE2Config(), "image_size": args.size,
                   "images": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
                   "trained_vqvae": recorded_path(trained), "trained_data": recorded_path(data),
                   "trained_image_size": size},
        "speed": speed,
        "codes": codes,
    }
    REPORT.publish(results, args.out)


def trained_image_size(vqvae_path):
    return load_vqvae(vqvae_path)[1]["image_size"]


def report(results):
    """(header, rows, notes) for the terminal and the markdown."""
    speed, codes, c = results["speed"], results["codes"], results["config"]
    header = ("", "fp32", "bf16 (fast path)")
    rows = [
        ("extraction images/s (median)", *(f"{speed[p]['median_images_per_s']:.1f}" for p in PRECISIONS)),
        ("images/s of each round", *(", ".join(f"{v:.1f}" for v in speed[p]["images_per_s"]) for p in PRECISIONS)),
        ("model.encode alone, images/s (median; bench vqvae's extraction)",
         *(f"{speed[p]['median_model_only_images_per_s']:.1f}" for p in PRECISIONS)),
        ("script / model alone", *(f"{speed[p]['median_images_per_s'] / speed[p]['median_model_only_images_per_s']:.0%}"
                                   for p in PRECISIONS)),
        ("other processes' CPU (median)",
         *(f"{statistics.median(speed[p]['other_cpu_use']):.0%}" for p in PRECISIONS)),
        ("bf16 / fp32, paired median", "", f"{speed['bf16_speedup_paired_median']:.2f}x"),
        ("trained VQ-VAE: reconstruction MSE of its codes",
         *(f"{codes['reconstruction_mse'][p]:.5f}" for p in PRECISIONS)),
    ]
    for level in ("top", "bottom"):
        rows.append((f"{level} codes bf16 changes (of codes / of images with any)", "",
                     f"{codes[level]['codes_changed']:.3%} / {codes[level]['images_with_a_change']:.1%}"))
    model = "the paper's VQ-VAE-2 (random weights)" if c["paper_model"] else "a tiny random VQ-VAE (--quick)"
    notes = [
        f"speed: {model}, {c['images']} random {c['image_size']}x{c['image_size']} images, batch {c['batch_size']}, "
        f"{c['rounds']} round(s) per precision, interleaved; images/s as extract_codes.py prints it for its "
        "extraction loop (loading, encoding, writing); model.encode alone: in this process, right after each "
        "script run, on as many random images already in memory, channels_last (fp32 or bf16 autocast), as "
        "`python -m bench vqvae` times extraction",
        f"codes: {c['trained_vqvae']} on {c['trained_data']} ({codes['images']} images of "
        f"{c['trained_image_size']}x{c['trained_image_size']}), extracted once in each precision; reconstruction MSE: "
        "each set of codes decoded in fp32 against the images, in [-1, 1]",
        *machine_lines(results),
    ]
    return header, rows, notes


REPORT = Report("extract", "Code extraction through extract_codes.py: fp32 vs bf16, and the codes bf16 changes",
                report,
                quick="a tiny random model and random images")


def add_arguments(parser):
    full, quick = FULL_DEFAULTS, QUICK_DEFAULTS
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds: "
                        + ", ".join(f"{k}={v}" for k, v in quick.items()))
    parser.add_argument("--size", type=int, help=f"image side of the speed run (default {full['size']})")
    parser.add_argument("--images", type=int, help=f"images per speed run (default {full['images']})")
    parser.add_argument("--batch-size", type=int, help=f"extraction batch (default {full['batch_size']})")
    parser.add_argument("--rounds", type=int, help=f"speed runs per precision (default {full['rounds']})")
    parser.add_argument("--trained-vqvae", help=f"trained VQ-VAE run for the codes (default {full['trained_vqvae']})")
    parser.add_argument("--data", default="builtin", help="the trained VQ-VAE's data (default builtin)")
    add_common_arguments(parser, "extract", seed_help="seed of the random weights and images")
