"""Training and evaluation data: the image datasets (built-in photos, CIFAR-10, ImageNet 32x32,
image folders), code databases as datasets, their hold-out rules and the model inputs of a batch."""
