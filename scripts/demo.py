"""The main job on built-in data, nothing to download: the whole VQ-VAE-2 pipeline in ~10 minutes.

1. trains a small VQ-VAE on 64x64 crops of scikit-image's sample photos (two held-out photos
   are the test set) and writes RUN/vqvae/reconstructions.png (originals above reconstructions);
2. encodes the training crops into an LMDB code database (8x8 top and 16x16 bottom codes);
3. trains a small top prior (class-conditional: the class is the source photo) and a bottom prior
   conditioned on the top codes and the class, both with label dropout 0.1 (so that sample.py and
   complete.py can use --guidance with them);
4. samples top codes, then bottom codes (cached sampler), decodes them, and writes
   RUN/samples.png: one row per class;
5. writes RUN/report.html (scripts/report.py): learning curves, warnings, pictures, code frequencies,
   and RUN/figures.json: the figures of the README's demo table (bench/results/demo.json is one run's).
Every stage resumes when the command is run again. The pixel-space demo is scripts/demo_pixels.py.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
import json

import torch

from pipelines.cli import run
from pipelines.eval.report import periodic_and_final, stored_config, write_report
from pipelines.eval.stages import psnr_db
from pipelines.infer.extract import extract_with_vqvae
from pipelines.infer.generation import generate, load_pipeline
from pipelines.store.checkpoint import write_image_grid
from pipelines.store.codes import read_metadata
from pipelines.store.outputs import check_output, output_file
from pipelines.store.run_files import has_state, read_log
from pipelines.train import priors
from pipelines.train import vqvae as train_vqvae

LABEL_DROPOUT = 0.1  # the priors learn a null class too: classifier-free guidance works with them


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for all stages (default runs/demo)")
    p.add_argument("--minutes", type=float, default=9.0,
                   help="training time of the three models together (default 9; extraction and sampling come on top)")
    p.add_argument("--size", type=int, default=64, help="image side (default 64: 8x8 top, 16x16 bottom codes)")
    p.add_argument("--per-class", type=int, default=6, help="samples per class in samples.png (default 6)")
    return p.parse_args()


def main():
    args = parse_args()
    out = check_output(args.out, "--out", directory=True)
    budget = {"vqvae": 0.4 * args.minutes, "top": 0.25 * args.minutes, "bottom": 0.35 * args.minutes}

    print("== 1/4 VQ-VAE")
    # the preset's learning rate: at 1e-3 the top codebook collapsed to 4% of its codes on the
    # built-in photos (seed 0; three seeds at 3e-4 kept 54-60%: bench/results/demo-vqvae-lr.md)
    train_vqvae.train(train_vqvae.VQVAETrainConfig(
        data="builtin", out=str(out / "vqvae"), preset="cpu-small", size=args.size, steps=3000,
        max_minutes=budget["vqvae"], batch_size=16, eval_every=1000, checkpoint_every=200,
        resume=has_state(out / "vqvae")))

    print("== 2/4 codes")
    count = extract_with_vqvae(out / "vqvae", "builtin", out / "codes.lmdb")
    print(f"{count} records in {out / 'codes.lmdb'}")

    for level in ("top", "bottom"):
        print(f"== 3/4 {level} prior")
        priors.train(priors.PriorTrainConfig(
            codes=str(out / "codes.lmdb"), level=level, out=str(out / level), preset=f"cpu-{level}",
            steps=3000, max_minutes=budget[level], eval_every=1000, checkpoint_every=200,
            label_dropout=LABEL_DROPOUT, resume=has_state(out / level)))

    print("== 4/4 samples")
    pipeline = load_pipeline(out / "vqvae", out / "top", out / "bottom")
    generator = torch.Generator().manual_seed(0)
    rows = [generate(pipeline, args.per_class, label, generator=generator)[0] for label in range(pipeline.n_classes)]
    write_image_grid(torch.cat(rows), out / "samples.png", nrow=args.per_class)
    print(f"reconstructions: {out / 'vqvae' / 'reconstructions.png'}")
    print(f"samples ({pipeline.n_classes} classes x {args.per_class}): {out / 'samples.png'}")
    print(f"report: {write_report([out], out / 'report.html')}")
    print(f"figures: {write_figures(out)}")


def final_evaluation(run_dir):
    """A stage's final evaluation (its log.jsonl's final line) and its stored training settings."""
    _, final = periodic_and_final(read_log(run_dir))
    if not final:
        raise ValueError(f"{run_dir} has no final evaluation in its log.jsonl: the stage has not finished")
    return final[0], stored_config(run_dir)


def demo_figures(out):
    """The figures of the README's demo table, read from the run directories in `out` and its code
    database: the VQ-VAE's final test evaluation, the records extracted, each prior's steps, time
    budget and final validation bits per code."""
    vqvae, vqvae_config = final_evaluation(out / "vqvae")
    figures = {
        "vqvae": {"preset": vqvae_config["preset"], "size": vqvae_config["size"], "steps": vqvae["step"],
                  "batch_size": vqvae_config["batch_size"], "test_mse": vqvae["mse"],
                  "psnr_db": psnr_db(vqvae["mse"]), "top_usage": vqvae["top_usage"],
                  "bottom_usage": vqvae["bottom_usage"]},
        "codes": {"records": read_metadata(out / "codes.lmdb")["count"]},
    }
    for level in ("top", "bottom"):
        prior, config = final_evaluation(out / level)
        figures[f"{level}_prior"] = {"preset": config["preset"], "steps": prior["step"],
                                     "max_minutes": config["max_minutes"], "label_dropout": config["label_dropout"],
                                     "validation_bits_per_code": prior["test_bits"]}
    return figures


def write_figures(out):
    """Writes RUN/figures.json (demo_figures) and returns its path."""
    path = out / "figures.json"
    with output_file(path) as tmp:
        tmp.write_text(json.dumps(demo_figures(out), indent=2) + "\n")
    return path


if __name__ == "__main__":
    run(main)
