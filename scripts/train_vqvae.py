"""Train the VQ-VAE (VQ-VAE-2, EMA codebooks, --levels N) on an image folder, CIFAR-10, ImageNet 32 or built-in photos.

Runs as `python scripts/train_vqvae.py ...` or `accelerate launch scripts/train_vqvae.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
Presets: vqvae2, the paper's ImageNet 256 model (two levels, codebooks 512 x 64, the default);
vqvae2-ffhq1024, the paper's three-level FFHQ 1024 model (--size 1024: 32x32, 64x64, 128x128 codes);
cpu-small, a quick CPU model.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

from pipelines.cli import config_parser, run
from pipelines.device import flush_denormals_in_thread_pool
from pipelines.train.vqvae import VQVAETrainConfig, train


def main():
    train(VQVAETrainConfig(**vars(config_parser(VQVAETrainConfig, __doc__).parse_args())))


if __name__ == "__main__":
    flush_denormals_in_thread_pool()  # a process that only trains: its threads compute denormals as zero
    run(main)
