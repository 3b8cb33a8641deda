"""Lossless image codecs as a yardstick: a density model's bits/dim is a compression rate, so it can
be held against the sizes of the files a user knows (PNG, WebP lossless) for the same images."""

import io

from PIL import Image

CODECS = {
    "PNG (compress_level 9, optimize)": dict(format="PNG", compress_level=9, optimize=True),
    "WebP lossless (method 6)": dict(format="WEBP", lossless=True, quality=100, method=6),
}


def codec_bits_per_subpixel(images, options):
    """8 x (bytes of the images encoded one file each, headers included) / (their sub-pixels);
    `images` uint8 (N, 3, S, S) or a list of (3, S, S)."""
    total_bytes = 0
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, **options)
        total_bytes += buffer.tell()
    return 8 * total_bytes / sum(image.numel() for image in images)
