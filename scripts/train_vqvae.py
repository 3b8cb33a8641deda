"""Train the two-level VQ-VAE (VQ-VAE-2, EMA codebooks) on an image folder, CIFAR-10, ImageNet 32 or built-in photos.

Runs as `python scripts/train_vqvae.py ...` or `accelerate launch scripts/train_vqvae.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
Presets: vqvae2, the paper's model (codebooks 512 x 64, the default); cpu-small, a quick CPU model.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

from pipelines.cli import config_parser, run
from pipelines.train.vqvae import VQVAETrainConfig, train


def main():
    train(VQVAETrainConfig(**vars(config_parser(VQVAETrainConfig, __doc__).parse_args())))


if __name__ == "__main__":
    run(main)
