"""Compress images losslessly with a pixel-space PixelSNAIL: one NAME.psnail file per image.

  python scripts/compress.py --ckpt runs/pixelsnail --out compressed photo.png photos/
  python scripts/decompress.py --ckpt runs/pixelsnail --out restored compressed/

Any size of 8-bit RGB image (a folder gives all its images); scripts/decompress.py with the same
model gives back its pixels exactly, as PNG. Other images (grey, palette, alpha, 16 bits) are
refused unless --convert, which codes them as 8-bit RGB. The model drives a range coder: a file
costs about the model's bits per sub-pixel, plus a header of about 90 bytes and 4 per tile. Each
image's tiles run through the network as a few large batches on the CPU (docs/codec.md). The file
holds the model's hash and the thread count: decoding uses the same model and threads.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse

from pipelines.cli import run, user_path
from pipelines.data.datasets import image_files
from pipelines.infer.codec import encode_image, load_codec_model, output_paths, read_codec_image
from pipelines.store.codec_file import SUFFIX
from pipelines.store.outputs import output_file


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=user_path, help="image files or folders of images")
    p.add_argument("--ckpt", type=user_path, required=True, help="the pixel model: run directory or checkpoint file")
    p.add_argument("--out", type=user_path, required=True, help=f"directory for one NAME{SUFFIX} per image")
    p.add_argument("--overwrite", action="store_true", help="replace files that exist in --out")
    p.add_argument("--convert", action="store_true",
                   help="code images that are not 8-bit RGB as 8-bit RGB (else they are refused)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while coding, recorded in each file for its decoding (default: torch's)")
    return p.parse_args()


def main():
    args = parse_args()
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    targets = output_paths(image_files(args.images), args.out, SUFFIX, args.overwrite)
    codec_model = load_codec_model(args.ckpt)
    total_bytes = total_subpixels = 0
    for file, target in targets.items():
        image = read_codec_image(file, args.convert)
        coded = encode_image(codec_model, image, threads=args.threads)
        with output_file(target) as tmp:
            tmp.write_bytes(coded.data)
        subpixels = image.numel()
        total_bytes, total_subpixels = total_bytes + len(coded.data), total_subpixels + subpixels
        excess = 100 * (8 * coded.payload_bytes / max(coded.ideal_bits, 1) - 1)
        print(f"{file} -> {target}: {len(coded.data):,} bytes, {8 * len(coded.data) / subpixels:.3f} bits/sub-pixel "
              f"(payload {coded.payload_bytes:,} bytes, {excess:+.2f}% over the ideal code length; header "
              f"{coded.header.size} bytes), {coded.seconds:.1f} s, {coded.seconds / (subpixels / 3e6):.1f} s/megapixel")
    print(f"compressed {len(targets)} images to {args.out}: {8 * total_bytes / total_subpixels:.3f} bits/sub-pixel")


if __name__ == "__main__":
    run(main)
