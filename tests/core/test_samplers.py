"""Samplers on a Gaussian data distribution with a closed-form denoiser; noise and uint8 helpers."""

import math

import pytest
import torch

from dmat.core.denoisers import build_denoiser
from dmat.core.samplers import (
    SAMPLERS,
    Churn,
    edm_sigma_steps,
    euler_sampler,
    heun_sampler,
    image_noise,
    per_image_randn_like,
    to_uint8,
)

MU, S = 0.3, 0.5  # data ~ N(μ, s²); s = σ_data as for EDM's images


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, class_labels) -> torch.Tensor:
    """Exact denoiser of N(μ, s²): E[x0 | x0 + σn = x] = (s²x + σ²μ)/(s² + σ²)."""
    assert x.dtype == torch.float32 and sigma.shape == (x.shape[0],)  # the network sees float32
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def quantile_latents(n: int) -> torch.Tensor:
    """Unit-normal quantiles: a Monte-Carlo-free 'sample', so what the tests measure is the sampler."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2) * torch.erfinv(2 * u - 1)).reshape(n, 1)


def moments(sampler, num_steps: int, **kwargs) -> tuple[float, float]:
    z = quantile_latents(4001)
    x = sampler(gaussian_denoiser, z / z.std(), None, edm_sigma_steps(num_steps), **kwargs)
    assert x.dtype == torch.float64 and x.shape == z.shape
    return x.mean().item(), x.std().item()


def test_sigma_steps_follow_edm_eq5() -> None:
    steps = edm_sigma_steps(18, 0.002, 80.0, 7.0)
    assert steps.dtype == torch.float64 and steps.shape == (19,)
    assert steps[0].item() == pytest.approx(80.0) and steps[17].item() == pytest.approx(0.002)
    assert steps[-1].item() == 0.0 and (steps[:-1] > steps[1:]).all()
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert steps[i].item() == pytest.approx(expected, rel=1e-12)


def test_heun_18_steps_reproduces_mean_and_variance() -> None:
    """Heun, 18 steps (35 NFE): the std is 5.5% high on this distribution (converges as O(h²))."""
    mean, std = moments(heun_sampler, 18)
    assert mean == pytest.approx(MU, abs=0.005)
    assert std == pytest.approx(S, rel=0.07)


def test_euler_with_many_steps_reproduces_mean_and_variance() -> None:
    mean, std = moments(euler_sampler, 200)
    assert mean == pytest.approx(MU, abs=0.005)
    assert std == pytest.approx(S, rel=0.02)


def test_heun_is_more_accurate_than_euler_at_equal_steps_and_equal_evaluations() -> None:
    heun_error = abs(moments(heun_sampler, 18)[1] - S)
    assert heun_error < abs(moments(euler_sampler, 18)[1] - S) / 2
    assert heun_error < abs(moments(euler_sampler, 35)[1] - S)


def test_heun_uses_2n_minus_1_evaluations_and_euler_n() -> None:
    calls = []

    def counting(x, sigma, labels):
        calls.append(sigma[0].item())
        return gaussian_denoiser(x, sigma, labels)

    heun_sampler(counting, torch.zeros(2, 1), None, edm_sigma_steps(7))
    assert len(calls) == 13 and min(calls) == pytest.approx(0.002)
    calls.clear()
    euler_sampler(counting, torch.zeros(2, 1), None, edm_sigma_steps(7))
    assert len(calls) == 7


def test_stochastic_churn_stays_close_and_is_reproducible() -> None:
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)

        def seeded_randn_like(x: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=gen, dtype=x.dtype)

        churn = Churn(s_churn=10.0, s_min=0.05, s_max=10.0)
        return heun_sampler(gaussian_denoiser, z, None, edm_sigma_steps(18), churn=churn, randn_like=seeded_randn_like)

    first = run()
    assert torch.equal(first, run())
    assert not torch.equal(first, heun_sampler(gaussian_denoiser, z, None, edm_sigma_steps(18)))
    assert first.mean().item() == pytest.approx(MU, abs=0.03)
    assert first.std().item() == pytest.approx(S, rel=0.15)


def test_samplers_share_one_signature_and_pass_labels_through() -> None:
    seen = []

    def recording(x, sigma, labels):
        seen.append(labels)
        return torch.zeros_like(x)

    labels = torch.tensor([3, 1])
    for sampler in SAMPLERS.values():
        out = sampler(recording, torch.ones(2, 3, 4, 4), labels, edm_sigma_steps(3, sigma_max=10.0))
        torch.testing.assert_close(out, torch.zeros(2, 3, 4, 4, dtype=torch.float64))  # D ≡ 0 ⇒ x → 0
    assert all(s is labels for s in seen)


def test_image_noise_depends_only_on_seed_class_and_index() -> None:
    shape = (3, 4, 4)
    batch = image_noise(7, 2, [0, 1, 2, 5, 9], shape)
    assert batch.shape == (5, *shape) and batch.dtype == torch.float32
    for position, index in enumerate([0, 1, 2, 5, 9]):
        assert torch.equal(image_noise(7, 2, [index], shape)[0], batch[position])
    assert torch.equal(image_noise(7, 2, [9, 5], shape), batch[[4, 3]])
    assert not torch.equal(image_noise(7, 3, [0], shape)[0], batch[0])  # another class
    assert not torch.equal(image_noise(8, 2, [0], shape)[0], batch[0])  # another seed
    assert not torch.equal(batch[0], batch[1])  # another index
    assert image_noise(7, 2, [], shape).shape == (0, *shape)
    with pytest.raises(ValueError):
        image_noise(-1, 0, [0], shape)


def test_churn_noise_is_per_image_so_stochastic_sampling_ignores_the_batch() -> None:
    """With churn on, each image's result is the same whether it is sampled alone or in a batch."""
    latents = image_noise(3, 0, range(5), (1,))
    classes, indices = [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]
    sigmas, churn = edm_sigma_steps(8), Churn(s_churn=20.0, s_noise=1.0)
    together = heun_sampler(gaussian_denoiser, latents, None, sigmas, churn=churn,
                            randn_like=per_image_randn_like(3, classes, indices))
    for k in range(5):
        alone = heun_sampler(gaussian_denoiser, latents[k:k + 1], None, sigmas, churn=churn,
                             randn_like=per_image_randn_like(3, classes[k:k + 1], indices[k:k + 1]))
        assert torch.equal(alone[0], together[k])
    deterministic = heun_sampler(gaussian_denoiser, latents, None, sigmas)
    assert not torch.equal(deterministic, together)  # the churn noise was used
    first = per_image_randn_like(3, [0], [0])(torch.zeros(1, 1))
    assert not torch.equal(first[0], latents[0])  # a stream apart from the initial noise


def test_image_noise_is_unit_gaussian() -> None:
    noise = image_noise(0, 0, range(64), (3, 8, 8))
    assert noise.mean().item() == pytest.approx(0.0, abs=0.03)
    assert noise.std().item() == pytest.approx(1.0, abs=0.03)


def test_to_uint8_follows_edm_conversion() -> None:
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]


def test_heun_drives_a_registry_denoiser_to_uint8_images() -> None:
    torch.manual_seed(0)
    denoiser = build_denoiser("unet-tiny", img_resolution=8, in_channels=3, num_classes=4).eval()
    latents = torch.cat([image_noise(0, c, [0, 1], (3, 8, 8)) for c in (1, 3)])
    images = to_uint8(heun_sampler(denoiser, latents, torch.tensor([1, 1, 3, 3]), edm_sigma_steps(3)))
    assert images.shape == (4, 8, 8, 3) and images.dtype == torch.uint8
