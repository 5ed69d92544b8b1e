"""DMAT: adversarially robust classifiers trained on real plus diffusion-generated data."""

__version__ = "0.1.0"
