"""Train pixel-space PixelSNAIL on CIFAR-10, ImageNet 32x32, an image folder or built-in photos.

Runs as `python scripts/train_pixelsnail.py ...` or `accelerate launch scripts/train_pixelsnail.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

from pipelines.cli import add_image_data_setting, add_pixelsnail_arguments, run, trainer_parser
from pipelines.train.pixels import TrainConfig, train
from prior import PRESETS


def main():
    d = TrainConfig()
    p = trainer_parser(__doc__, d, PRESETS, "run directory (checkpoints, samples, log)")
    add_image_data_setting(p)
    add_pixelsnail_arguments(p)
    p.add_argument("--n-samples", type=int, default=d.n_samples, help="samples drawn into samples.png at the end")
    train(TrainConfig(**vars(p.parse_args())))


if __name__ == "__main__":
    run(main)
