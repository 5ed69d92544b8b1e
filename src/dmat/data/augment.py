"""Batch-level image augmentation in pure torch, the same for real and generated images.

The reference trains CIFAR with RandomCrop(32, padding=4) + RandomHorizontalFlip and SVHN without
augmentation (Wang et al. 2023, DM-Improves-AT core/data). Here both act on a whole batch at once.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Augmentation = Callable[..., Tensor]


def random_crop_flip(
    images: Tensor, *, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Random H×W crops of the zero-padded batch (torchvision RandomCrop(padding=4)), each mirrored
    horizontally with probability 1/2.

    `images` is (N, C, H, W) of any dtype (uint8 or float). Each image gets its own offset in
    [0, 2·padding]², drawn with `generator` (on any device); one gather builds the whole batch.
    """
    n, channels, height, width = images.shape
    device = generator.device if generator is not None else images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device).to(images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (N, W)
    if flip:
        mirrored = torch.rand(n, generator=generator, device=device).to(images.device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    padded = F.pad(images, (padding,) * 4)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def augmentation_for(dataset_name: str) -> Augmentation | None:
    """The training augmentation of the reference for a dataset: none for SVHN, crop + flip otherwise."""
    return None if dataset_name == "svhn" else random_crop_flip
