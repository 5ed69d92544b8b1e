"""Batch random crop (zero padding) and horizontal flip."""

import pytest
import torch
import torch.nn.functional as F

from dmat.data.augment import augmentation_for, random_crop_flip

PAD = 2


def _images(n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Distinct non-zero pixels, so zero padding and every shift or mirror are recognisable."""
    return (torch.arange(n * 2 * 5 * 6).view(n, 2, 5, 6) % 250 + 1).to(dtype)


def _windows(image: torch.Tensor) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every crop of the zero-padded image, plain and mirrored, keyed by (row, col, mirrored)."""
    padded = F.pad(image, (PAD,) * 4)
    height, width = image.shape[-2:]
    return {
        (row, col, mirrored): window.flip(-1) if mirrored else window
        for row in range(2 * PAD + 1)
        for col in range(2 * PAD + 1)
        for mirrored in (False, True)
        for window in [padded[:, row : row + height, col : col + width]]
    }


def _which_window(image: torch.Tensor, output: torch.Tensor) -> tuple[int, int, bool]:
    matches = [key for key, window in _windows(image).items() if torch.equal(window, output)]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_every_output_is_a_shifted_window_of_the_zero_padded_image(dtype) -> None:
    images = _images(300, dtype)
    out = random_crop_flip(images, padding=PAD, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype
    keys = [_which_window(image, output) for image, output in zip(images, out, strict=True)]
    assert not any(mirrored for _, _, mirrored in keys)
    # All 25 offsets, the extreme ones included (torchvision draws them from [0, 2·padding]).
    assert {(row, col) for row, col, _ in keys} == {
        (r, c) for r in range(2 * PAD + 1) for c in range(2 * PAD + 1)
    }


def test_flip_happens_about_half_the_time() -> None:
    images = _images(2000)
    out = random_crop_flip(images, padding=PAD, generator=torch.Generator().manual_seed(0))
    mirrored = [
        _which_window(image, output)[2] for image, output in zip(images[:200], out[:200], strict=True)
    ]
    assert 0.4 < sum(mirrored) / len(mirrored) < 0.6
    unshifted = random_crop_flip(images, padding=0, generator=torch.Generator().manual_seed(1))
    flipped = (unshifted == images.flip(-1)).flatten(1).all(dim=1)
    assert ((unshifted == images).flatten(1).all(dim=1) ^ flipped).all()
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_seeded_generator_makes_it_deterministic() -> None:
    images = _images(64)
    first, again = (random_crop_flip(images, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, random_crop_flip(images, generator=torch.Generator().manual_seed(6)))


def test_augmentation_is_off_for_svhn_only() -> None:
    assert augmentation_for("svhn") is None
    assert augmentation_for("cifar10") is random_crop_flip
    assert augmentation_for("cifar100") is random_crop_flip
