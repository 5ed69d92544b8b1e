"""Core numerics: networks, attacks, diffusion, losses, EMA. Pure PyTorch: no file I/O, no MLflow, no params."""
