"""Encode a dataset with a trained VQ-VAE-2 into an LMDB database of top and bottom codes.

The database is what PixelSNAIL trains on in the second stage. Extraction is resumable: if it is
stopped, running the same command again continues after the last batch written; a database made
from another checkpoint, split or image size is refused.

It runs on CUDA when there is one (--device chooses), in fp32 unless --precision says otherwise,
and on several processes under `accelerate launch`: they share the images and still write one
database, the very one a single process writes. The encoder stays fp32 by default: on the demo's
trained VQ-VAE, bf16 chose another code for 2.1% of the top and 1.9% of the bottom codes (near
ties: the reconstruction error did not change), touching 95% of the images; --precision bf16
(or auto) is the fast path, about twice the images/s on this CPU (bench/results/extract.md).

  accelerate launch --num_processes 4 scripts/extract_codes.py --vqvae runs/vqvae --data ~/photos --out codes.lmdb
  accelerate launch --multi_gpu --num_processes 2 scripts/extract_codes.py ...   # 2 processes on a CPU-only machine
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse

from accelerate import PartialState

from pipelines.cli import HelpFormatter, run, user_path
from pipelines.device import add_runtime_arguments
from pipelines.infer.extract import extract_with_vqvae
from pipelines.store.outputs import check_output

INTERRUPTED = "interrupted: the batches committed so far are kept; run the same command again to resume"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--vqvae", type=user_path, required=True, help="VQ-VAE-2 run directory or checkpoint file")
    p.add_argument("--data", type=user_path, required=True, help="'builtin' (crops of scikit-image's sample photos), "
                   "a CIFAR-10 tarball/folder, an ImageNet 32x32 npz file/folder, or an image folder")
    p.add_argument("--out", type=user_path, required=True, help="code database to write (an LMDB directory)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="the split of --data to encode")
    p.add_argument("--size", type=int, default=None,
                   help="image size (default: the size the VQ-VAE was trained on)")
    p.add_argument("--n-classes", type=int, default=None,
                   help="number of classes (default: largest label of the split + 1, or 0 when the "
                        "dataset does not list its labels); give the train split's value for test")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (and per transaction)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (per process)")
    add_runtime_arguments(p, precision_default="fp32", precision_note=
                          "; fp32 by default: bf16 changes about 2%% of the codes (bench/results/extract.md)")
    return p.parse_args()


def main():
    args = parse_args()
    check_output(args.out, "--out", directory=True)  # an LMDB directory: made, or resumed, by the extraction
    count = extract_with_vqvae(args.vqvae, args.data, args.out, args.split, args.size, args.n_classes,
                               args.batch_size, args.workers, args.device, args.precision)
    PartialState().print(f"{args.out}: {count} records, complete")  # true whether this run wrote them or found them


if __name__ == "__main__":
    run(main, interrupted=INTERRUPTED)
