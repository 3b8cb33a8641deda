"""Heat maps of the bits a model spends at each position of an image, drawn over the image.

One PNG per image: the image, then one panel per map (the pixel model's bits per pixel, or the
top and the bottom prior's bits per code), each map stretched over the whole image (a code
position covers the patch of pixels it was encoded from) and drawn half transparent with a
colour bar in bits. Each panel has its own scale, from 0 to its largest value.
"""

from matplotlib.figure import Figure

from pipelines.store.outputs import output_file

PANEL_INCHES = 2.6
ALPHA = 0.6
COLORMAP = "inferno"


def write_heat_map(path, image, maps, title=""):
    """image: uint8 (3, S, S) tensor; maps: [(panel title, bits (H, W) tensor)], written atomically as a PNG."""
    pixels = image.permute(1, 2, 0).cpu().numpy()  # (S, S, 3)
    height, width = pixels.shape[:2]
    figure = Figure(figsize=(PANEL_INCHES * (1 + len(maps)) + 0.6 * len(maps), PANEL_INCHES + 0.5), dpi=100)
    axes = figure.subplots(1, 1 + len(maps), squeeze=False)[0]
    axes[0].imshow(pixels, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    for axis, (panel_title, bits) in zip(axes[1:], maps):
        bits = bits.float().cpu().numpy()
        axis.imshow(pixels, interpolation="nearest")
        shown = axis.imshow(bits, cmap=COLORMAP, alpha=ALPHA, interpolation="nearest", vmin=0, vmax=max(bits.max(), 1e-6),
                            extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04).set_label("bits", fontsize=8)
        axis.set_title(panel_title, fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    with output_file(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
