"""Data layer: canonical array stores, sources, the real/synthetic batch sampler, tensor augmentation."""
