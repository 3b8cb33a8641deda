"""The hold-out rules, one per kind of data, side by side: what a model never trains on, so that
its test figures measure data it has not seen.

- A dataset with splits of its own (CIFAR-10, ImageNet 32x32's files, train/ beside test/, val/,
  valid/ or validation/ folders) keeps them: any of those four names the test split.
- The built-in photos: whole photos are held out; test crops come only from them.
- Images without splits (a flat folder, one .npz file): every 10th image (0, 10, 20, ...) is test.
- A code database: every 20th record (0, 20, 40, ...) is held out from the priors.
"""

BUILTIN_TEST_PHOTOS = ("chelsea", "coffee")
IMAGE_TEST_EVERY = 10
CODE_HELD_OUT_EVERY = 20
TRAIN_FOLDER = "train"
TEST_FOLDERS = ("test", "val", "valid", "validation")  # each names the test split beside train/


def is_test_photo(name: str) -> bool:
    return name in BUILTIN_TEST_PHOTOS


def is_test_image(index: int) -> bool:
    """Whether the index-th image of a source without splits of its own is a test image."""
    return index % IMAGE_TEST_EVERY == 0


def is_held_out_record(index: int) -> bool:
    """Whether the index-th record of a code database is held out from the priors."""
    return index % CODE_HELD_OUT_EVERY == 0
