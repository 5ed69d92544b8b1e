"""Pictures worth looking at: sample grids written as PNG (for MLflow and `dvc plots`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dmat.files import atomic_path


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 N×H×W×C → one uint8 image, `columns` images per row, white padding between them."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid[..., 0] if c == 1 else grid


def save_png(path: str | Path, image: np.ndarray, scale: int = 1) -> None:
    """Write a uint8 image atomically; `scale` enlarges tiny images (nearest neighbour) for viewing."""
    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def save_curve(path: str | Path, x: list[float], series: dict[str, list[float]], *, xlabel: str, ylabel: str,
               title: str) -> None:
    """A line chart (one line per series) written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
    for label, values in series.items():
        axes.plot(x, values, marker="o", label=label)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
