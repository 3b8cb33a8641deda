"""Complete images: keep the top part of each exactly and sample the rest, --n times.

  # a pixel model: the top half of every image in photos/, 4 completions each
  python scripts/complete.py --ckpt runs/pixelsnail photos/ --keep 0.5 --n 4 --out-dir completions
  # the VQ-VAE-2 pipeline: the top 24 rows of two images, as class 3, 6 completions each
  python scripts/complete.py --vqvae runs/vqvae --top runs/top --bottom runs/bottom a.png b.png \\
      --keep 24 --label 3 --n 6 --out-dir completions
  # a pipeline of three levels (or more): one prior per level, top first
  python scripts/complete.py faces/ --vqvae runs/vqvae --priors runs/top runs/middle runs/bottom --out-dir completions

Images (files or folders of them) are read as an image folder reads them: 8-bit RGB, the shorter
side resized to the model's image size and the centre kept. --keep is a fraction of the rows (0.5)
or a row count from 2 up (24): 1 is the fraction, the whole image. For each image --out-dir gets NNNN_NAME.png, one row: the image, the kept
part (the rest grey), then the completions.

A pixel model (--ckpt) keeps the kept pixels exactly. The pipeline (--vqvae --top --bottom, or
--vqvae --priors) encodes the image, keeps at each level the code rows that cover the kept rows,
samples the rest of the top codes, then the rest of each level below, and decodes: its kept part is the VQ-VAE's rendering of
the kept codes. --temperature, --top-k, --top-p and --guidance apply to the pipeline's priors as in
scripts/sample.py. Image k's completions draw from a generator seeded by (--seed, k). Runs on CUDA
when there is one (--device, --precision as scripts/sample.py).
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipelines.cli import (add_config_options, add_model_options, check_paths_given, chosen_model, label_option, options_of,
                           run, user_path)
from pipelines.data.datasets import image_files, read_image
from pipelines.device import add_runtime_arguments, one_process_runtime
from pipelines.infer.completion import complete_codes, complete_pixels, kept_rows, with_rest_blank
from pipelines.infer.generation import check_drawing, load_pipeline, parse_label, read_label, sample_generators
from pipelines.store.checkpoint import load_pixelsnail, write_image_grid
from pipelines.store.outputs import check_output
from prior.drawing import Drawing

LABEL_FORMS = ("class",)  # one class for all completions


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", type=user_path, help="image files or folders of images (before --priors)")
    add_model_options(p, levels=True)
    p.add_argument("--keep", default="0.5", help="rows kept: a fraction of the rows in [0, 1] (0.5, the default; 1 keeps "
                   "the whole image, as 1.0 does) or a row count from 2 up (24)")
    p.add_argument("--n", type=int, default=4, help="completions per image (default 4)")
    label_option(p, LABEL_FORMS, "the class of the completions, needed by class-conditional models")
    add_config_options(p, Drawing)
    p.add_argument("--seed", type=int, default=0, help="seed of the completions' generators (default 0)")
    p.add_argument("--out-dir", type=user_path, required=True, help="directory for one grid PNG per image")
    add_runtime_arguments(p)
    return p.parse_args()


def check_args(args):
    check_paths_given(args.images, args, "the images to complete")
    args.pipeline = chosen_model(args)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    args.drawing = options_of(Drawing, args)
    parse_label(args.label, LABEL_FORMS)
    check_output(args.out_dir, "--out-dir", directory=True)


def main():
    args = parse_args()
    check_args(args)
    runtime = one_process_runtime("complete.py", args.device, args.precision)
    files = image_files(args.images)
    complete, size = completer(args, runtime)
    images = torch.stack([read_image(file, size) for file in files])  # (N, 3, S, S) uint8, all read first
    rows = kept_rows(args.keep, size)
    out_dir = Path(args.out_dir)  # made by the first grid written
    for k, (file, image) in enumerate(zip(tqdm(files, desc="images"), runtime.images(images))):
        generator = sample_generators(args.seed, [k], runtime.device)[0]
        with runtime.autocast():
            completions = complete(image, rows, generator)
        grid = torch.cat([image[None], with_rest_blank(image, rows)[None], completions.float()])
        write_image_grid(grid, out_dir / f"{k:04d}_{file.stem}.png", nrow=len(grid))
    print(f"wrote {len(files)} grids of {args.n} completions (kept {rows} of {size} rows) to {out_dir}")


def completer(args, runtime):
    """Loads the model(s) and checks the options against them -> (complete(image, rows,
    generator) -> (n, 3, S, S) completions, the image size S)."""
    if args.pipeline is None:
        model, _ = load_pixelsnail(args.ckpt)
        c = model.config
        args.drawing.check(c)
        if not c.pixel_mode or c.shape[0] != c.shape[1]:
            raise ValueError(f"{args.ckpt} is not a square pixel-space model (shape {c.shape}, codes {c.n_codes})")
        label = read_label(args.label, LABEL_FORMS, c.n_classes, "the model is")
        model = model.to(runtime.device).eval()
        return lambda image, rows, generator: complete_pixels(model, image, rows, args.n, label, generator), c.shape[0]
    pipeline = load_pipeline(*args.pipeline).to(runtime)
    check_drawing(pipeline, args.drawing)
    label = read_label(args.label, LABEL_FORMS, pipeline.n_classes)

    def complete(image, rows, generator):
        return complete_codes(pipeline, image, rows, args.n, label, args.drawing, generator)[0]

    return complete, pipeline.image_size


if __name__ == "__main__":
    run(main)
