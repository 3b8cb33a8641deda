"""Decompress .psnail files (scripts/compress.py) into PNGs: NAME.psnail -> NAME.png.

  python scripts/decompress.py --ckpt runs/pixelsnail --out restored compressed/ photo.psnail

--ckpt must be the model that compressed them (the file holds its hash). Decoding runs the very
batches and thread count encoding ran, and checks each tile against its checksum: a file that is
damaged, or a machine whose floats differ, fails in one line naming the first bad tile and writes
no image. A folder gives all its .psnail files.
"""

from pipelines.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # before the slow imports below

import argparse
import time
from pathlib import Path

from PIL import Image

from pipelines.cli import run, user_path
from pipelines.infer.codec import codec_files, decode_image, load_codec_model, output_paths
from pipelines.store.codec_file import SUFFIX
from pipelines.store.outputs import output_file


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=user_path, help=f"{SUFFIX} files or folders of them")
    p.add_argument("--ckpt", type=user_path, required=True, help="the pixel model that compressed them")
    p.add_argument("--out", type=user_path, required=True, help="directory for one NAME.png per file")
    p.add_argument("--overwrite", action="store_true", help="replace files that exist in --out")
    return p.parse_args()


def main():
    args = parse_args()
    targets = output_paths(codec_files(args.files), args.out, ".png", args.overwrite)
    codec_model = load_codec_model(args.ckpt)
    for file, target in targets.items():
        start = time.perf_counter()
        image = decode_image(codec_model, Path(file).read_bytes(), file)
        with output_file(target) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        seconds = time.perf_counter() - start
        print(f"{file} -> {target}: {image.shape[2]}x{image.shape[1]}, {seconds:.1f} s, "
              f"{seconds / (image[0].numel() / 1e6):.1f} s/megapixel")
    print(f"decompressed {len(targets)} files to {args.out}")


if __name__ == "__main__":
    run(main)
