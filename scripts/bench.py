"""Benchmarks of this code on this machine, with the numbers written to JSON and markdown.

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
  streams the real prior trainer on cpu-bottom with one and with two streams, at equal wall time,
          the two side by side (one thread each), several seeds: validation bits per code.
  vqvae   VQ-VAE-2 (the paper's model) training and code-extraction images/s at 256x256, fp32
          vs bf16 autocast vs bf16 autocast + channels_last, interleaved in one run.
  codecs  the pixel model's bits/dim after 2, 5 and 10 minutes of training (one run per seed) beside
          PNG and WebP lossless on the same crops: of the held-out photos and of another photo; a plot.
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
  lmdb    a code database of 20,000 records (32x32 top, 64x64 bottom codes) read through a
          DataLoader: records/s with 0, 2 and 4 workers, fork vs spawn, interleaved in one run.

Examples:
  python scripts/bench.py train                 # five models, about 15 minutes on 2 idle cores
  python scripts/bench.py train --cases top-11m --compile   # one model, torch.compile too
  python scripts/bench.py train --cases vqvae2-top,vqvae2-bottom --steps 1 --add   # the paper's priors, batch 1
  python scripts/bench.py train --quick         # smoke run with tiny models, seconds
  python scripts/bench.py precision             # nine cpu-small runs, about 40 minutes
  python scripts/bench.py sample                # three models, under 10 minutes on 2 idle cores
  python scripts/bench.py sample --quick        # smoke run with tiny models, seconds
  python scripts/bench.py streams --codes runs/demo/codes.lmdb   # 3 seeds x 4 minutes
  python scripts/bench.py vqvae                 # the paper's VQ-VAE-2 at 256x256, a few minutes
  python scripts/bench.py vqvae --quick         # smoke run, 32x32 and tiny channels, seconds
  python scripts/bench.py extract               # after `make demo` (its VQ-VAE), a few minutes
  python scripts/bench.py extract --quick       # smoke run, a tiny model, seconds
  python scripts/bench.py eval --run-dir runs/demo  # after `make demo`, about 10 minutes on 2 cores
  python scripts/bench.py guidance --demo runs/demo   # after `make demo`, about 25 minutes
  python scripts/bench.py guidance --quick --demo runs/demo --work /tmp/guidance   # smoke run, a few minutes
  python scripts/bench.py lmdb                  # 205 MB database, about 2 minutes
  python scripts/bench.py lmdb --quick          # smoke run, a tiny database, seconds
  python scripts/bench.py ood                   # after make demo and make demo-pixels, minutes
  python scripts/bench.py ood --quick           # smoke run with tiny random models, seconds
  python scripts/bench.py gpu                   # one CUDA GPU, a few minutes
  python scripts/bench.py codecs                # about 15 minutes per seed on 2 idle cores
"""

import argparse
import inspect
import sys
from pathlib import Path

# the repository root first: from scripts/, this file would shadow the bench package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (codecs, evaluate, extract, gpu, guidance, lmdb, ood, precision, sample, streams, train,  # noqa: E402
                   vqvae)
from pipelines.cli import run

SUBCOMMANDS = {
    "train": (train, "training steps/s and FLOP/s of every model, fp32 vs the bf16 fast path"),
    "precision": (precision, "bf16 against fp32: training loss and test bits/dim of the real trainer, against a control, three seeds"),
    "sample": (sample, "naive vs cached sampling time for three models"),
    "streams": (streams, "cpu-bottom with one and with two streams at equal wall time: validation bits per code"),
    "vqvae": (vqvae, "VQ-VAE-2 training and extraction images/s, fp32 vs bf16 vs bf16 + channels_last"),
    "extract": (extract, "extraction images/s through extract_codes.py, fp32 vs bf16, and the codes bf16 changes"),
    "eval": (evaluate, "every stage of a pipeline run through evaluate.py: numbers, real-data ceilings, seconds"),
    "guidance": (guidance, "classifier-free guidance: samples classified as the class asked for at guidance 0, 1, 2, 4, top-p 0.9"),
    "lmdb": (lmdb, "code database reads through a DataLoader, records/s, 0/2/4 workers, fork vs spawn"),
    "codecs": (codecs, "the pixel model's test bits/dim after 2, 5, 10 minutes against PNG and WebP lossless"),
    "ood": (ood, "AUROC of likelihood scores between held-out crops and noise, flipped, inverted crops, another photo"),
    "gpu": (gpu, "one CUDA GPU: training steps/s and memory per example, extraction, hierarchical sampling"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, summary) in SUBCOMMANDS.items():
        p = subparsers.add_parser(name, help=summary, description=inspect.cleandoc(module.run.__doc__),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    run(main)  # a bad path or value: one line, as every script says it
