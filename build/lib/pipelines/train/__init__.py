"""Training: the run's settings and state, the runtime (accelerator, loaders, signals), the one
loop with its diagnostics, and one task per model: PixelSNAIL on pixels or codes, the VQ-VAE."""
