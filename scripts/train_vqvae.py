"""Train the two-level VQ-VAE (VQ-VAE-2, EMA codebooks) on an image folder, CIFAR-10, ImageNet 32 or built-in photos.

Runs as `python scripts/train_vqvae.py ...` or `accelerate launch scripts/train_vqvae.py ...`
(on CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`).
Presets: vqvae2, the paper's model (codebooks 512 x 64, the default); cpu-small, a quick CPU model.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

from pipelines.cli import add_image_data_setting, add_run_setting, run, trainer_parser
from pipelines.train.vqvae import VQVAETrainConfig, train
from vqvae.presets import PRESETS


def main():
    d = VQVAETrainConfig()
    p = trainer_parser(__doc__, d, PRESETS, "run directory (checkpoint, reconstructions, log)")
    add_image_data_setting(p)
    add_run_setting(p, "--size", type=int, help="image side, a multiple of 8 (default 256: 32x32 top, 64x64 bottom codes)")
    p.add_argument("--n-images", type=int, default=d.n_images, help="test images in reconstructions.png")
    train(VQVAETrainConfig(**vars(p.parse_args())))


if __name__ == "__main__":
    run(main)
