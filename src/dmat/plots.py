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
               title: str, ylim: tuple[float, float] | None = (0, 1), log_axes: bool = False) -> None:
    """A line chart (one line per series) written atomically as PNG; `ylim` None fits the data, `log_axes`
    makes both axes logarithmic."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
    for label, values in series.items():
        axes.plot(x, values, marker="o", label=label)
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim is not None:
        axes.set_ylim(ylim)
    if log_axes:
        axes.set(xscale="log", yscale="log")
    axes.grid(alpha=0.3)
    axes.legend()
    _save_figure(plt, figure, path)


def save_scatter_over_density(path: str | Path, ticks: np.ndarray, log_density: np.ndarray,
                              layers: list[tuple[str, np.ndarray, str]], *, title: str) -> None:
    """2-D points over the contours of a density: `log_density[i, j]` is its log at (ticks[j], ticks[i]); each
    layer is (label, points (n, 2), colour), drawn in order. Written atomically as PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    _density_scatter(axes, ticks, log_density, layers, title)
    axes.legend(loc="upper right", fontsize=7, markerscale=3)
    _save_figure(plt, figure, path)


def save_scatter_panels(path: str | Path, ticks: np.ndarray, log_density: np.ndarray,
                        panels: dict[tuple[int, int], tuple[str, np.ndarray]], rows: int, columns: int, *,
                        title: str) -> None:
    """A rows × columns grid of 2-D sample sets over one density's contours; `panels[(row, column)]` is
    (panel title, points (n, 2)). Written atomically as PNG."""
    plt = _pyplot()
    figure, grid = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), dpi=100, squeeze=False)
    for (row, column), (label, points) in panels.items():
        _density_scatter(grid[row][column], ticks, log_density, [("samples", points, "tab:blue")], label)
    for axes in grid.flat:
        axes.set(xticks=[], yticks=[])
    figure.suptitle(title)
    _save_figure(plt, figure, path)


def _density_scatter(axes, ticks: np.ndarray, log_density: np.ndarray, layers: list[tuple[str, np.ndarray, str]],
                     title: str) -> None:
    top = float(log_density.max())
    axes.contour(ticks, ticks, log_density, levels=np.linspace(top - 12, top, 7), colors="0.55", linewidths=0.7,
                 linestyles="solid")
    for label, points, colour in layers:
        axes.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color=colour, label=label, linewidths=0)
    axes.set(xlim=(ticks[0], ticks[-1]), ylim=(ticks[0], ticks[-1]), aspect="equal")
    axes.set_title(title, fontsize=8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    from matplotlib import pyplot as plt

    return plt


def _save_figure(plt, figure, path: str | Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
