"""Train a VQ-VAE-2 prior: PixelSNAIL over one level's code grid of a code database.

  accelerate launch scripts/train_prior.py --codes codes.lmdb --level top --out runs/top
  accelerate launch scripts/train_prior.py --codes codes.lmdb --level bottom --out runs/bottom

--level names a level of the database (top and bottom; top, middle and bottom for three levels)
or counts it from the top: 0 (top) to N-1 (bottom). The top prior is conditioned on the class label
(when the database has labels); every other level's prior on the codes of the level above it and
the label. Grid and codebook always come from the database; the preset (default cpu-top /
cpu-bottom; vqvae2-top / vqvae2-bottom and vqvae2-ffhq-top / -middle / -bottom follow the paper)
gives the network. On CPU, two real processes: `accelerate launch --multi_gpu --num_processes 2 ...`.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

from pipelines.cli import config_parser, run
from pipelines.device import flush_denormals_in_thread_pool
from pipelines.train.priors import PriorTrainConfig, train


def main():
    train(PriorTrainConfig(**vars(config_parser(PriorTrainConfig, __doc__).parse_args())))


if __name__ == "__main__":
    flush_denormals_in_thread_pool()  # a process that only trains: its threads compute denormals as zero
    run(main)
