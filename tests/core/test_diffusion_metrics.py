"""Diffusion-model metrics against known answers: Gaussian-optimal denoisers, Gaussian Fréchet distances,
hand-made point sets for k-NN precision/recall, copies for memorisation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmat.core.denoisers import build_denoiser
from dmat.core.diffusion_at import DiffusionATConfig
from dmat.core.diffusion_metrics import (
    ClassMeans,
    FeatureMoments,
    NearestNeighbours,
    adversarial_perturbation,
    class_mean_agreement,
    conditional_accuracy,
    denoiser_robustness,
    feature_statistics,
    frechet_distance,
    inception_feature_network,
    inception_features,
    inside_manifold,
    knn_precision_recall,
    knn_radii,
    memorisation,
    memorisation_threshold,
)

BOX = DiffusionATConfig(mode="adversarial", rho=2.0, floor_min=12 / 255, floor_max=12 / 255)


class GaussianOptimalDenoiser(nn.Module):
    """The exact denoiser of data x0 ~ N(mean, var·I): D(x; σ) = mean + var/(var + σ²)·(x − mean).

    var = 0 is data concentrated at one point, whose optimal denoiser ignores its input.
    """

    def __init__(self, mean: float, var: float) -> None:
        super().__init__()
        self.mean, self.var = mean, var

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        shrink = (self.var / (self.var + sigma**2)).reshape(-1, 1, 1, 1)
        return self.mean + shrink * (x - self.mean)


def expected_radius(sigma: float) -> float:
    return (sigma / math.sqrt(1 + sigma**2)) ** 2 + 12 / 255


def robustness(denoiser, x0, sigma: float, steps: int = 5, seed: int = 0) -> dict[str, float]:
    result = denoiser_robustness(denoiser, x0, None, sigma, BOX, attack_steps=steps,
                                 generator=torch.Generator().manual_seed(seed))
    return {name: values.double().mean().item() for name, values in result.items()}


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0])
def test_gaussian_optimal_denoiser_gives_the_closed_form(sigma: float) -> None:
    """Error var·σ²/(var + σ²); a linear map k·(σω) changes by k²σ²·E ω² = k²σ²r²/3 at random and by
    k²σ²r² at the box corner, which PGD reaches exactly (the signed gradient of a linear map is constant)."""
    mean, var = 0.1, 0.25
    x0 = mean + math.sqrt(var) * torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = robustness(GaussianOptimalDenoiser(mean, var), x0, sigma)
    k, r = var / (var + sigma**2), expected_radius(sigma)
    assert got["radius"] == pytest.approx(r, rel=1e-6)
    assert got["denoise_error"] == pytest.approx(var * sigma**2 / (var + sigma**2), rel=0.03)
    assert got["random_change"] == pytest.approx(k**2 * sigma**2 * r**2 / 3, rel=0.03)
    assert got["adversarial_change"] == pytest.approx(k**2 * sigma**2 * r**2, rel=1e-4)


def test_data_at_one_point_has_a_perfect_and_perfectly_stable_denoiser() -> None:
    x0 = torch.full((8, 3, 8, 8), 0.3)
    got = robustness(GaussianOptimalDenoiser(0.3, 0.0), x0, 1.0)
    assert got["denoise_error"] < 1e-12 and got["random_change"] < 1e-12 and got["adversarial_change"] < 1e-12


def test_identity_denoiser_passes_every_perturbation_through() -> None:
    """D(x) = x: the error is σ²·E n², and the output moves exactly as much as the input."""
    x0 = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    sigma, r = 0.5, expected_radius(0.5)
    got = robustness(lambda x, s, y: x, x0, sigma)
    assert got["denoise_error"] == pytest.approx(sigma**2, rel=0.03)
    assert got["adversarial_change"] == pytest.approx(sigma**2 * r**2, rel=1e-4)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    return build_denoiser("unet-tiny", img_resolution=8, in_channels=3, num_classes=2).eval().requires_grad_(False)


def test_pgd_on_a_network_stays_in_the_box_and_beats_random_perturbations(unet: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    sigma, labels = torch.full((8,), 1.0), torch.randint(0, 2, (8,), generator=gen)
    radius = torch.linspace(0.05, 0.5, 8).reshape(-1, 1, 1, 1)  # a different box for every sample
    start = (2 * torch.rand(x.shape, generator=gen) - 1) * radius
    with torch.no_grad():
        clean = unet(x, sigma, labels)
    omega, change, start_change = adversarial_perturbation(unet, x, sigma, labels, clean, start, radius, steps=5)
    assert (omega.abs() <= radius + 1e-7).all()
    assert (change >= start_change).all()
    assert change.mean() > 5 * start_change.mean()  # the ascent does work on a nonlinear network
    with torch.no_grad():
        recomputed = (unet(x + omega, sigma, labels) - clean).square().flatten(1).mean(1)
    torch.testing.assert_close(change, recomputed)


def test_denoiser_robustness_is_seeded(unet: nn.Module) -> None:
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    first, again, other = (robustness(unet, x0, 0.2, steps=2, seed=s) for s in (0, 0, 1))
    assert first == again and first != other
    assert first["adversarial_change"] >= first["random_change"] > 0


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(5)) * 3 + 1
    stats = feature_statistics(features)
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians() -> None:
    """Commuting covariances: d² = ‖μ1 − μ2‖² + Σ(√a − √b)²."""
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mean1, mean2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(mean1, torch.diag(a), mean2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def _random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    m = rng.normal(size=(dim, dim))
    return m @ m.T + 0.1 * np.eye(dim)


def test_frechet_distance_of_general_gaussians_matches_the_closed_form() -> None:
    """Non-commuting covariances: tr((C1·C2)^½) from the eigenvalues of the unsymmetrised product."""
    rng = np.random.default_rng(6)
    cov1, cov2 = _random_spd(6, rng), _random_spd(6, rng)
    mean1, mean2 = rng.normal(size=6), rng.normal(size=6)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov1 @ cov2).real).sum()
    expected = ((mean1 - mean2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt
    got = frechet_distance(*(torch.from_numpy(t) for t in (mean1, cov1, mean2, cov2)))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples_approaches_the_gaussians_distance() -> None:
    rng = np.random.default_rng(7)
    cov1, cov2 = _random_spd(3, rng) / 3, _random_spd(3, rng) / 3
    mean1, mean2 = np.zeros(3), np.array([0.5, -0.5, 1.0])
    exact = frechet_distance(*(torch.from_numpy(t) for t in (mean1, cov1, mean2, cov2)))
    samples1 = torch.from_numpy(rng.multivariate_normal(mean1, cov1, size=100_000))
    samples2 = torch.from_numpy(rng.multivariate_normal(mean2, cov2, size=100_000))
    assert frechet_distance(*feature_statistics(samples1), *feature_statistics(samples2)) == pytest.approx(exact,
                                                                                                          rel=0.02)


def test_streamed_moments_equal_numpys_mean_and_covariance() -> None:
    features = torch.randn(301, 5, generator=torch.Generator().manual_seed(8)) * 10 + 50
    moments = FeatureMoments()
    for chunk in features.split(64):
        moments.update(chunk)
    mean, cov = moments.statistics()
    np.testing.assert_allclose(mean.numpy(), features.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(features[:1])


def test_conditional_accuracy_overall_and_per_class() -> None:
    predicted, conditioning = torch.tensor([0, 0, 1, 2, 2, 0]), torch.tensor([0, 0, 0, 2, 2, 2])
    overall, per_class = conditional_accuracy(predicted, conditioning, num_classes=4)
    assert overall == pytest.approx(4 / 6)
    assert per_class[:3].tolist() == pytest.approx([2 / 3, float("nan"), 2 / 3], nan_ok=True)
    assert math.isnan(per_class[3])


def test_inception_network_loads_torchvision_weights_and_refuses_others() -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    network = inception_feature_network(weights)
    features = inception_features(network, torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    with pytest.raises(RuntimeError):
        inception_feature_network({"conv.weight": torch.zeros(3, 3)})


def _class_images(n_per_class: int, seed: int, *, swap_layout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright top half; class 1: bright bottom half; class 2: bright left half; plus noise.
    Colours: class c tinted in channel c. `swap_layout` exchanges the layouts of classes 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    halves = {0: (slice(0, 4), slice(None)), 1: (slice(4, 8), slice(None)), 2: (slice(None), slice(0, 4))}
    for c in range(3):
        x = 0.3 + 0.1 * torch.rand(n_per_class, 3, 8, 8, generator=generator)
        rows, cols = halves[{0: 1, 1: 0}.get(c, c) if swap_layout else c]
        x[:, :, rows, cols] += 0.4
        x[:, c] += 0.2
        images.append(x)
        labels.append(torch.full((n_per_class,), c))
    return torch.cat(images), torch.cat(labels)


def _means(images: torch.Tensor, labels: torch.Tensor, batch: int = 7) -> torch.Tensor:
    means = ClassMeans(3, cell=2)
    for start in range(0, len(images), batch):  # streamed in batches that cut across classes
        means.update(images[start:start + batch], labels[start:start + batch])
    return means.means()


def test_class_means_stream_to_the_pooled_per_class_means() -> None:
    images, labels = _class_images(10, 0)
    expected = torch.stack([F.avg_pool2d(images[labels == c].double(), 2).mean(0) for c in range(3)])
    torch.testing.assert_close(_means(images, labels), expected)


def test_class_mean_agreement_scores_matching_colour_and_layout_and_catches_swapped_layouts() -> None:
    real = _means(*_class_images(50, 0))
    same = class_mean_agreement(real, _means(*_class_images(50, 1)))
    assert same["colour"] > 0.95 and same["layout"] > 0.95
    swapped = class_mean_agreement(real, _means(*_class_images(50, 1, swap_layout=True)))
    assert swapped["colour"] > 0.95 and swapped["layout"] < 0.0  # right colours, wrong layouts
    alike = class_mean_agreement(real, real[:1].expand_as(real))  # classes that do not differ at all
    assert alike == pytest.approx({"colour": 0.0, "layout": 0.0}, abs=1e-9)


def test_class_mean_agreement_leaves_out_classes_without_images() -> None:
    real = _means(*_class_images(20, 0))
    images, labels = _class_images(20, 1)
    keep = labels != 2
    generated = _means(images[keep], labels[keep])
    assert generated[2].isnan().all()
    agreement = class_mean_agreement(real, generated)
    assert agreement["layout"] > 0.9 and math.isfinite(agreement["colour"])


# --- k-NN precision/recall and memorisation -----------------------------------------------------------------


def _line(*points: float) -> torch.Tensor:
    """Points on a line, as (N, 1) feature vectors."""
    return torch.tensor(points, dtype=torch.float64)[:, None]


def test_knn_radii_are_the_distance_to_the_kth_other_point() -> None:
    real = _line(0, 1, 2, 3, 4)
    torch.testing.assert_close(knn_radii(real, k=1), _line(1, 1, 1, 1, 1).flatten())
    # k = 3: from 0 the third other point is 3; from 2 it is one of 0 / 4 (the others are 1 and 3).
    torch.testing.assert_close(knn_radii(real, k=3), _line(3, 2, 2, 2, 3).flatten())
    torch.testing.assert_close(knn_radii(_line(0, 0, 5), k=1), _line(0, 0, 5).flatten())  # a duplicate is a neighbour
    with pytest.raises(ValueError, match="k"):
        knn_radii(real, k=5)


def test_knn_precision_recall_on_hand_made_point_sets() -> None:
    # Real 0..4 with k = 1: balls of radius 1, manifold [-1, 5]. Generated {0, 0.2, 10, 10.2}: radius 0.2
    # each, manifold [-0.2, 0.4] ∪ [9.8, 10.4]. Precision: 0 and 0.2 are real-like, 2/4. Recall: of the real
    # points only 0 is covered, 1/5.
    result = knn_precision_recall(_line(0, 1, 2, 3, 4), _line(0, 0.2, 10, 10.2), k=1)
    assert result == {"precision": pytest.approx(0.5), "recall": pytest.approx(0.2)}
    # The ball's boundary belongs to it: 5 lies exactly at distance 1 from 4.
    assert knn_precision_recall(_line(0, 1, 2, 3, 4), _line(5, 5.5), k=1)["precision"] == pytest.approx(0.5)


def test_knn_precision_recall_identical_sets_score_one_and_far_sets_zero() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=g)
    assert knn_precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    assert knn_precision_recall(real, real + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_knn_precision_recall_sees_a_collapsed_generator() -> None:
    """Mode collapse: generated samples all near one real point are realistic (precision 1) but cover
    little of the real variety (recall low) — what FD alone cannot separate from small shifts."""
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 2, generator=g, dtype=torch.float64)
    collapsed = real[:1] + 0.01 * torch.randn(400, 2, generator=g, dtype=torch.float64)
    result = knn_precision_recall(real, collapsed)
    assert result["precision"] == 1.0 and result["recall"] < 0.05


def test_coverage_is_the_same_in_any_chunk_size_and_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    real, generated = torch.randn(130, 3, 4, 4, generator=g), torch.randn(70, 3, 4, 4, generator=g) * 1.2
    radii = knn_radii(real, 3, chunk=17)
    distances = torch.cdist(real.flatten(1).double(), real.flatten(1).double())
    torch.testing.assert_close(radii, distances.sort(dim=1).values[:, 3])
    brute = (torch.cdist(generated.flatten(1).double(), real.flatten(1).double()) <= radii).any(dim=1)
    assert torch.equal(inside_manifold(generated, real, radii, chunk=9), brute)
    assert knn_precision_recall(real, generated, chunk=11) == knn_precision_recall(real, generated)


def test_nearest_neighbours_streamed_in_chunks_match_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    queries, reference = torch.rand(50, 3, 8, 8, generator=g), torch.rand(203, 3, 8, 8, generator=g)
    nearest = NearestNeighbours(queries, chunk=16)
    for block in reference.split(64):  # as if read from a memory-mapped store
        nearest.update(block)
    distances = torch.cdist(queries.flatten(1).double(), reference.flatten(1).double())
    torch.testing.assert_close(nearest.distances, distances.min(dim=1).values)
    assert torch.equal(nearest.indices, distances.argmin(dim=1))
    with pytest.raises(ValueError, match="no reference"):
        _ = NearestNeighbours(queries).distances


def test_a_copied_training_image_is_memorised_and_fresh_ones_are_not() -> None:
    g = torch.Generator().manual_seed(4)
    training, held_out = torch.rand(200, 3, 8, 8, generator=g), torch.rand(100, 3, 8, 8, generator=g)
    copy = training[17:18] + 0.002 * torch.randn(1, 3, 8, 8, generator=g)  # a copy up to uint8 rounding
    generated = torch.cat([copy, torch.rand(9, 3, 8, 8, generator=g)])

    def nearest_training(images: torch.Tensor) -> NearestNeighbours:
        nearest = NearestNeighbours(images)
        nearest.update(training)
        return nearest

    found = nearest_training(generated)
    assert found.indices[0] == 17
    result = memorisation(found.distances, nearest_training(held_out).distances, quantile=0.05)
    assert result["rate"] == pytest.approx(0.1)  # the copy, and none of the 9 fresh images
    assert result["threshold"] > float(found.distances[0])


def test_memorisation_threshold_is_calibrated_on_real_data() -> None:
    calibration = torch.arange(1, 1001, dtype=torch.float64)  # distances 1..1000
    # The lower 1% order statistic: 10 of the 1000 real images lie at or below it.
    assert memorisation_threshold(calibration, 0.01) == 10.0
    assert memorisation(calibration, calibration, 0.01)["rate"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="quantile"):
        memorisation_threshold(calibration, 0.0)
    with pytest.raises(ValueError, match="calibration"):
        memorisation_threshold(torch.zeros(0), 0.01)
