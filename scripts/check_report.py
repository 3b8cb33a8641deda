"""Renders a report (scripts/report.py) in headless Chromium and checks that the screenshot is not blank.

    python scripts/check_report.py runs/demo/report.html --screenshot /tmp/report.png

Look at the screenshot too: this check only says that the page drew something. Chromium is not a
dependency of the project (Debian: apt-get install chromium). The browser runs offline: no network
services, no sync, a throwaway profile.
"""

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.cli import HelpFormatter, run, user_path
from pipelines.store.outputs import check_output, output_file

MIN_DRAWN = 0.01  # a screenshot with fewer pixels than this (as a share) off its background colour is blank


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("report", type=user_path, help="the HTML file")
    p.add_argument("--screenshot", type=user_path, required=True, help="the PNG to write")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the browser")
    p.add_argument("--window-size", default="1200,3000", help="width,height in pixels")
    p.add_argument("--timeout", type=float, default=120, help="seconds before the browser is given up on")
    return p.parse_args()


def screenshot(chromium, page, png, window_size, timeout):
    """Chromium's headless screenshot of `page` (a file) into `png`."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   f"--screenshot={png}", f"--window-size={window_size}", page.resolve().as_uri()]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{chromium} took over {timeout:.0f} s to render {page}") from None
    if result.returncode or not png.is_file() or not png.stat().st_size:
        raise OSError(f"{chromium} wrote no screenshot (exit {result.returncode}): {result.stderr.strip()[-300:]}")


def drawn_share(png):
    """The share of the screenshot's pixels that differ from its most common colour (the background)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return 1 - counts.max() / len(pixels)


def main():
    args = parse_args()
    page, png = Path(args.report), Path(args.screenshot)
    if not page.is_file():
        raise FileNotFoundError(f"{page} is not a file")
    if shutil.which(args.chromium) is None:
        raise FileNotFoundError(f"{args.chromium} not found: install Chromium (Debian: apt-get install chromium)")
    check_output(png, "--screenshot", (".png",))
    with output_file(png) as tmp:  # Chromium writes PNG whatever the name's suffix
        screenshot(args.chromium, page, tmp, args.window_size, args.timeout)
    share = drawn_share(png)
    if share < MIN_DRAWN:
        raise ValueError(f"the screenshot {png} is blank: {share:.2%} of its pixels drawn")
    print(f"screenshot: {png} ({share:.1%} of its pixels drawn)")


if __name__ == "__main__":
    run(main)
