"""The main job on built-in data, nothing to download.

Trains the `cpu-small` pixel-space PixelSNAIL for 10 minutes on 32x32 crops of scikit-image's
bundled sample photos, then prints the exact test bits/dim (EMA weights, over crops of held-out
photos) beside what PNG and WebP lossless files of the same crops take, and writes a grid of
samples. Running it again resumes the same run and trains further.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse

from pipelines.cli import run
from pipelines.data.datasets import load_dataset
from pipelines.eval.codecs import CODECS, codec_bits_per_subpixel
from pipelines.store.run_files import has_state
from pipelines.train.pixels import TrainConfig, train
from prior import get_preset

PRESET = "cpu-small"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo-pixels", help="run directory")
    p.add_argument("--steps", type=int, default=5000, help="total training steps of the run")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget of this session")
    args = p.parse_args()
    train(TrainConfig(data="builtin", out=args.out, preset=PRESET, steps=args.steps,
                      max_minutes=args.minutes, eval_every=200, checkpoint_every=100,
                      resume=has_state(args.out)))
    test = load_dataset("builtin", "test", get_preset(PRESET).model.shape[0])  # the crops the model was scored on
    print(f"the same {len(test)} held-out crops as image files, in bits per sub-pixel: " + ", ".join(
        f"{name} {codec_bits_per_subpixel(test.images, options):.3f}" for name, options in CODECS.items()))


if __name__ == "__main__":
    run(main)
