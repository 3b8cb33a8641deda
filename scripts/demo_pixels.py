"""The main job on built-in data, nothing to download.

Trains the `cpu-small` pixel-space PixelSNAIL for a few minutes on 32x32 crops of scikit-image's
bundled sample photos, then prints the exact test bits/dim (EMA weights, over held-out photos)
and writes a grid of samples. Running it again resumes the same run and trains further.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse

from pipelines.cli import run
from pipelines.run_state import has_state
from pipelines.train_pixel import TrainConfig, train


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo-pixels", help="run directory")
    p.add_argument("--steps", type=int, default=600, help="total training steps of the run")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget of this session")
    args = p.parse_args()
    train(TrainConfig(data="builtin", out=args.out, preset="cpu-small", steps=args.steps,
                      max_minutes=args.minutes, eval_every=200, checkpoint_every=100,
                      resume=has_state(args.out)))


if __name__ == "__main__":
    run(main)
