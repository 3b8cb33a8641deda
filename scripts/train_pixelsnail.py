"""Train pixel-space PixelSNAIL on CIFAR-10, ImageNet 32x32, an image folder or built-in photos.

Runs as `python scripts/train_pixelsnail.py ...` or `accelerate launch scripts/train_pixelsnail.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

from pipelines.cli import config_parser, run
from pipelines.device import flush_denormals_in_thread_pool
from pipelines.train.pixels import TrainConfig, train


def main():
    train(TrainConfig(**vars(config_parser(TrainConfig, __doc__).parse_args())))


if __name__ == "__main__":
    flush_denormals_in_thread_pool()  # a process that only trains: its threads compute denormals as zero
    run(main)
