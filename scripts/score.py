"""Scores every image: how many bits a model needs for it, into a CSV, and optionally where.

A pixel-space PixelSNAIL (--ckpt) gives each image's bits/dim; the VQ-VAE-2 pipeline (--vqvae --top
--bottom, or --vqvae --priors TOP [MIDDLE ...] BOTTOM) encodes each image and gives each level's
bits per code (the top prior's, then each level's given the codes above it: columns
top_bits_per_code, [middle_bits_per_code,] bottom_bits_per_code), their total bits and the
VQ-VAE's reconstruction MSE (images in [-1, 1]).
Given a class, the bits/dim is exactly the per-image figure whose mean evaluate.py prints.

Images: a dataset split (--data, as the trainers take it, with --split), or image files and folders
(every image in them, resized and centre-cropped to the model's size).

Classes (class-conditional models): --label N scores every image as class N; --label data (the
default for --data) with its dataset's labels; --label mixture with the class unknown, under the
uniform mixture of the model's classes (p(x) = mean over c of p(x | c)). Loose files have no class:
give --label N or --label mixture.

--maps DIR writes one PNG per CSV row (row k: DIR/00000k.png, or DIR/00000k_<file name>.png): the
image beside the bits at each position drawn over it (per pixel, its three values together, or per
code position of each grid, stretched over the image), so the regions the model finds surprising
stand out. The maps sum to the total bits.

Example:
    python scripts/score.py --ckpt runs/demo-pixels --data builtin --out scores.csv --maps maps/
    python scripts/score.py --vqvae runs/demo/vqvae --top runs/demo/top --bottom runs/demo/bottom \\
        --label mixture photo.png photos/ --out scores.csv
    python scripts/score.py faces/ --vqvae runs/vqvae --priors runs/top runs/middle runs/bottom --out scores.csv
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
from functools import partial

from pipelines.cli import HelpFormatter, add_model_options, check_paths_given, chosen_model, label_option, run, user_path
from pipelines.data.datasets import ImageFiles, load_dataset
from pipelines.device import add_runtime_arguments, one_process_runtime
from pipelines.infer.extract import count_classes
from pipelines.infer.generation import load_pipeline, parse_label
from pipelines.infer.scoring import LABEL_FORMS, choose_labels, score_dataset, score_pipeline, score_pixels
from pipelines.store.checkpoint import load_pixelsnail
from pipelines.store.outputs import check_output


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("images", nargs="*", type=user_path, help="image files or folders (instead of --data; before --priors)")
    add_model_options(p, levels=True)
    p.add_argument("--data", type=user_path, help="a dataset as the trainers take it ('builtin' included)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="the split of --data")
    label_option(p, LABEL_FORMS, "the class of every image, for class-conditional models",
                 "; default data for --data, required for files")
    p.add_argument("--out", type=user_path, default="scores.csv", help="the CSV written")
    p.add_argument("--maps", type=user_path, metavar="DIR", help="also write a heat map PNG per image into DIR")
    p.add_argument("--batch-size", type=int, default=32, help="images scored together")
    add_runtime_arguments(p, precision_default="fp32", precision_note="; default fp32, as evaluate.py")
    return p.parse_args()


def check_args(args):
    args.pipeline = chosen_model(args)
    parse_label(args.label, LABEL_FORMS)
    if args.data is not None and args.images:
        raise ValueError("give the images as --data (a dataset) or as files and folders, one of the two")
    if args.data is None:
        check_paths_given(args.images, args, "the images as --data (a dataset) or as files and folders")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output(args.out, "--out", (".csv",))
    if args.maps is not None:
        check_output(args.maps, "--maps", directory=True)


def main():
    args = parse_args()
    check_args(args)
    runtime = one_process_runtime("score.py", args.device, args.precision)
    if args.pipeline is None:
        model, _ = load_pixelsnail(args.ckpt)
        if not model.config.pixel_mode:
            raise ValueError(f"{args.ckpt} is a code-mode prior: score codes with --vqvae --top --bottom (or --priors)")
        size, n_classes = model.config.shape[0], model.config.n_classes
        score = partial(score_pixels, model.to(runtime.device), runtime=runtime)
    else:
        pipeline = load_pipeline(*args.pipeline)
        size, n_classes = pipeline.image_size, pipeline.n_classes
        score = partial(score_pipeline, pipeline.to(runtime), runtime=runtime)
    if args.data is not None:
        dataset = load_dataset(args.data, args.split, size)
        names, source, dataset_classes = [str(i) for i in range(len(dataset))], args.data, count_classes(dataset)
    else:
        dataset = ImageFiles(args.images, size)
        names, source, dataset_classes = [str(file) for file in dataset.files], "image files", 0
    chosen = choose_labels(args.label, n_classes, dataset_classes, source)
    print(f"{len(dataset)} images of {size}x{size} on {runtime.device}, precision {runtime.precision}")
    means = score_dataset(score, dataset, names, chosen, args.out, args.maps,
                          args.batch_size, runtime.device)
    print(f"wrote {args.out}" + (f" and {len(dataset)} heat maps in {args.maps}" if args.maps else ""))
    print("mean " + ", ".join(f"{column}: {value:.4f}" for column, value in means.items()))


if __name__ == "__main__":
    run(main)
