"""Benchmarks of this code on this machine, with the numbers written to JSON and markdown:
`python -m bench NAME [options]` from the repository root (bench/ is not installed).

Subcommands:
  train   training steps/s of every model the project trains (a top prior of the public
          implementation's size, the cifar10, vqvae2-top-256ch and vqvae2-bottom-256ch presets, the
          VQ-VAE at 256x256; the paper's vqvae2-top and vqvae2-bottom with --cases), fp32 vs the
          bf16 fast path (optionally compiled), interleaved in one run, with each step's counted
          FLOPs, the achieved FLOP/s and its fraction of the matmul peak measured in the same run.
  precision  the real trainer in fp32, in bf16 and in fp32 with a 0.1% higher learning rate (a
          control) for three seeds, each checkpoint evaluated in fp32: is the bf16 - fp32 gap
          within the control's drift?
  sample  naive (one full forward per position) vs cached (prior.sampling, one new position per
          step) sampling time for a top-prior-like code model, a bottom-prior-like conditioned
          code model and the cpu-small pixel preset, interleaved in one run; the naive sampler is
          timed on a prefix of positions and scaled to the whole grid.
  streams the real prior trainer on cpu-bottom with one and with two streams, at equal wall time
          or at equal steps, the two side by side (one thread each), several seeds: validation bits
          per code and the step times.
  vqvae   VQ-VAE-2 (the paper's model) training and code-extraction images/s at 256x256, fp32
          vs bf16 autocast vs bf16 autocast + channels_last, interleaved in one run.
  codecs  the pixel model's bits/dim after 2, 5 and 10 minutes of training (one run per seed) beside
          PNG and WebP lossless on the same crops: of the held-out photos and of another photo; a plot.
  recipe  a pixel preset's Polyak average and learning rate: one run of the real trainer per variant
          to fixed step counts, scored on the held-out crops (the choice) and another photo (the check).
  codec   the pixel model as a real lossless codec (compress.py's files) on whole held-out photos,
          trained 10 and 60 minutes, beside PNG, WebP lossless and JPEG-XL lossless: bits per
          sub-pixel from file sizes, encode and decode seconds per megapixel; a plot.
  ood     out-of-distribution detection by likelihood: AUROC of the pixel model's bits/dim and of
          the pipeline's bits (total, per level) between held-out crops and noise, flipped crops,
          colour-inverted crops and another photo.
  gpu     one CUDA GPU (make gpu-check runs it after the CUDA tests): training steps/s, model
          FLOP/s and memory per example of cifar10 and the paper-size priors in bf16, VQ-VAE
          training and extraction images/s at 256x256, 16 hierarchical samples in fp32 and bf16.
  extract code extraction through scripts/extract_codes.py itself, fp32 vs the bf16 fast path,
          interleaved in one run, and the fraction of codes bf16 changes on a trained VQ-VAE.
  eval    every stage of a pipeline run through scripts/evaluate.py: the VQ-VAE's reconstructions and
          codebook use, both priors' held-out and train bits per code, the samples' CAS and local
          FID / KID beside the real-data ceilings, and how long each evaluation takes.
  guidance  classifier-free guidance measured: a top and bottom prior trained with label dropout on
          the demo's codes, a classifier of the built-in crops' classes, and the fraction of samples
          classified as the class asked for at guidance 0, 1, 2, 4 and at top-p 0.9.
  revisions  scripts/sample.py on a pipeline run under an earlier git revision and under this
          tree, alternating, at several batch sizes: what a change to the sampler gained or cost.
  denormals  denormal floats flushed to zero or kept: the trainer resuming a confident cpu-small run, and
          the codec coding a photo with a young and a confident model, alternating in one run.
  lmdb    a code database of 20,000 records (32x32 top, 64x64 bottom codes) read through a
          DataLoader: records/s with 0, 2 and 4 workers, fork vs spawn, interleaved in one run.

Examples:
  python -m bench train                 # five models, about 15 minutes on 2 idle cores
  python -m bench train --cases top-11m --compile   # one model, torch.compile too
  python -m bench train --cases vqvae2-top,vqvae2-bottom --steps 1 --add   # the paper's priors, batch 1
  python -m bench train --quick         # smoke run with tiny models, seconds
  python -m bench precision             # nine cpu-small runs, about 40 minutes
  python -m bench sample                # three models, under 10 minutes on 2 idle cores
  python -m bench sample --quick        # smoke run with tiny models, seconds
  python -m bench streams --codes runs/demo/codes.lmdb   # 3 seeds x 4 minutes
  python -m bench streams --steps 1000          # 3 seeds x 1000 steps (streams-steps.md)
  python -m bench vqvae                 # the paper's VQ-VAE-2 at 256x256, a few minutes
  python -m bench vqvae --quick         # smoke run, 32x32 and tiny channels, seconds
  python -m bench extract               # after `make demo` (its VQ-VAE), a few minutes
  python -m bench extract --quick       # smoke run, a tiny model, seconds
  python -m bench eval --run-dir runs/demo  # after `make demo`, about 10 minutes on 2 cores
  python -m bench guidance --demo runs/demo   # after `make demo`, about 25 minutes
  python -m bench guidance --quick --demo runs/demo --work /tmp/guidance   # smoke run, a few minutes
  python -m bench denormals             # about 25 minutes on 2 idle cores
  python -m bench lmdb                  # 205 MB database, about 2 minutes
  python -m bench lmdb --quick          # smoke run, a tiny database, seconds
  python -m bench ood                   # after make demo and make demo-pixels, minutes
  python -m bench ood --quick           # smoke run with tiny random models, seconds
  python -m bench gpu                   # one CUDA GPU, a few minutes
  python -m bench codecs                # about 15 minutes per seed on 2 idle cores
  python -m bench recipe                # four cpu-small variants to 1,400 steps, about 50 minutes
  python -m bench codec                 # about 90 minutes on 2 idle cores (70 of training)
  python -m bench codec --quick         # smoke run, the tiny preset on 24x24 crops, a minute
  python -m bench revisions --before d7312e8   # after make demo, a few minutes
"""

import argparse
import inspect

from bench import (codec, codecs, denormals, evaluate, extract, gpu, guidance, lmdb, ood, precision, recipe, revisions,
                   sample, sample_pipeline, streams, train, vqvae)
from pipelines.cli import run

SUBCOMMANDS = {
    "train": (train, "training steps/s and FLOP/s of every model, fp32 vs the bf16 fast path"),
    "precision": (precision, "bf16 against fp32: training loss and test bits/dim of the real trainer, against a control, three seeds"),
    "sample": (sample, "naive vs cached sampling time for three models (--pipeline: hierarchical sampling at the paper's size)"),
    "streams": (streams, "cpu-bottom with one and with two streams at equal wall time or equal steps: validation bits per code, step times"),
    "vqvae": (vqvae, "VQ-VAE-2 training and extraction images/s, fp32 vs bf16 vs bf16 + channels_last"),
    "extract": (extract, "extraction images/s through extract_codes.py, fp32 vs bf16, and the codes bf16 changes"),
    "eval": (evaluate, "every stage of a pipeline run through evaluate.py: numbers, real-data ceilings, seconds"),
    "guidance": (guidance, "classifier-free guidance: samples classified as the class asked for at guidance 0, 1, 2, 4, top-p 0.9"),
    "denormals": (denormals, "denormal floats flushed or kept: the trainer on a confident model, the codec, side by side"),
    "lmdb": (lmdb, "code database reads through a DataLoader, records/s, 0/2/4 workers, fork vs spawn"),
    "codecs": (codecs, "the pixel model's test bits/dim after 2, 5, 10 minutes against PNG and WebP lossless"),
    "recipe": (recipe, "a pixel preset's Polyak average and learning rate, variants trained to equal steps and scored"),
    "codec": (codec, "the pixel model's codec on whole held-out photos against PNG, WebP and JPEG-XL lossless: bits, s/MP"),
    "ood": (ood, "AUROC of likelihood scores between held-out crops and noise, flipped, inverted crops, another photo"),
    "revisions": (revisions, "scripts/sample.py under an earlier git revision and under this tree, side by side"),
    "gpu": (gpu, "one CUDA GPU: training steps/s and memory per example, extraction, hierarchical sampling"),
}


def run_sample(args):
    """`sample`, or with --pipeline the hierarchical sampling benchmark (bench/sample_pipeline.py)."""
    (sample_pipeline if args.pipeline else sample).run(args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, summary) in SUBCOMMANDS.items():
        p = subparsers.add_parser(name, help=summary, description=inspect.cleandoc(module.run.__doc__),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=run_sample if module is sample else module.run)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    run(main)  # a bad path or value: one line, as every script says it
