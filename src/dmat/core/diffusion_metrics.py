"""Evaluation of a diffusion model: denoiser robustness, Fréchet distance, conditional accuracy,
agreement of the per-class mean images with the real ones.

Denoiser robustness measures exactly what diffusion AT trains for (docs/method.md, dmat.core.diffusion_at):
on clean data x0 noised as x = x0 + σ·n, the denoising error ‖D(x) − x0‖², and the change of the
denoised output R(ω) = ‖D(x + σω) − D(x)‖² under a perturbation ω in noise units inside the box
[−r, r], r = `box_radius(σ)`, with ω uniform (random) or found by PGD (adversarial). Squared norms are
per-pixel means, as in the training loss.

Sample quality without downloads: the Fréchet distance between two feature sets (Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule...", the FID formula, in any feature space) and the
conditional accuracy of generated images under a classifier. The FID's Inception-v3 is built here
from a state dict the caller loaded; nothing is downloaded.

Coverage and copying, which a Fréchet distance cannot show: k-NN manifold precision and recall
(Kynkäänniemi et al. 2019) in a feature space, and a nearest-training-image memorisation rate whose
threshold is calibrated on real images the model never saw (`memorisation`). Distances are computed
in chunks, in float64, so no N×N matrix is ever built.

Pure PyTorch, no file I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmat.core.diffusion_at import Denoiser, DiffusionATConfig, box_radius

INCEPTION_SIZE = 299  # FID resizes every image to Inception-v3's input size
# Madry et al. 2018's rule, also used for checkpoint selection: the steps together can cross the box 1.25 times.
PGD_STEP_FRACTION = 2.5


def _mean_square(x: Tensor) -> Tensor:
    """Per-sample mean of squares over every dimension but the first."""
    return x.square().flatten(1).mean(dim=1)


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    """(N,) → (N, 1, 1, ...) to broadcast against `like`."""
    return value.reshape(-1, *[1] * (like.ndim - 1))


def output_change(denoiser: Denoiser, x: Tensor, sigma: Tensor, labels: Tensor | None, clean: Tensor,
                  omega: Tensor) -> Tensor:
    """R(ω) = ‖D(x + σω) − D(x)‖² per sample; `clean` is D(x)."""
    return _mean_square(denoiser(x + _per_sample(sigma, x) * omega, sigma, labels) - clean)


def adversarial_perturbation(denoiser: Denoiser, x: Tensor, sigma: Tensor, labels: Tensor | None, clean: Tensor,
                             start: Tensor, radius: Tensor, *, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """PGD in the box [−r, r] that maximises R(ω) (signed gradient ascent, step 2.5·r/steps, projection).

    Starts at `start` and keeps every sample's best iterate, so the result is never below R(start).
    `radius` broadcasts against x. Returns (ω, R(ω), R(start)), detached.
    """
    step = PGD_STEP_FRACTION * radius / steps
    omega, best_omega, best, start_change = start.detach().clone(), None, None, None
    for i in range(steps):
        omega.requires_grad_(True)
        change = output_change(denoiser, x, sigma, labels, clean, omega)
        (grad,) = torch.autograd.grad(change.sum(), omega)
        if i == 0:
            start_change = change.detach()
        best_omega, best = _keep_better(best_omega, best, omega.detach(), change.detach())
        omega = torch.clamp(omega.detach() + step * grad.sign(), min=-radius, max=radius)
    with torch.no_grad():
        best_omega, best = _keep_better(best_omega, best, omega, output_change(denoiser, x, sigma, labels, clean,
                                                                                omega))
    return best_omega, best, start_change


def _keep_better(best_omega: Tensor | None, best: Tensor | None, omega: Tensor,
                 change: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the perturbation with the larger change so far."""
    if best is None:
        return omega, change
    better = change > best
    return torch.where(_per_sample(better, omega), omega, best_omega), torch.where(better, change, best)


def denoiser_robustness(denoiser: Denoiser, x0: Tensor, labels: Tensor | None, sigma: float,
                        box: DiffusionATConfig, *, attack_steps: int,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Per-sample robustness of the denoiser at noise level σ on clean data `x0` (docs/method.md).

    x = x0 + σ·n, n ~ N(0, I); r = box_radius(σ, box); ω ~ U[−r, r] in noise units (the input moves by
    σ·ω, as in training). `generator` (a CPU generator) drives n, the radius floor and ω. Returns
    (N,) float tensors: ``denoise_error`` ‖D(x) − x0‖², ``random_change`` R(ω), ``adversarial_change``
    R at the PGD optimum started from that same ω (so never below the random change), and ``radius`` r.
    """
    device, dtype = x0.device, x0.dtype
    sigmas = torch.full((len(x0),), float(sigma), dtype=dtype)
    radius = _per_sample(box_radius(sigmas, box, generator).to(device), x0)
    noise = torch.randn(x0.shape, generator=generator, dtype=dtype).to(device)
    start = ((2 * torch.rand(x0.shape, generator=generator, dtype=dtype) - 1).to(device) * radius)
    sigmas = sigmas.to(device)
    x = x0 + float(sigma) * noise
    with torch.no_grad():
        clean = denoiser(x, sigmas, labels)
    _, adversarial, random = adversarial_perturbation(denoiser, x, sigmas, labels, clean, start, radius,
                                                      steps=attack_steps)
    return {"denoise_error": _mean_square(clean - x0), "random_change": random, "adversarial_change": adversarial,
            "radius": radius.flatten()}


class FeatureMoments:
    """Streaming mean and covariance of feature batches (float64 sums): no feature matrix is kept."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, features: Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).flatten(1)
        if self.total is None:
            self.total, self.outer = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(
                f.shape[1], f.shape[1], dtype=torch.float64)
        self.count += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased (N − 1) covariance, as FID computes them."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, (cov + cov.T) / 2


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of an (N, D) feature matrix, float64."""
    moments = FeatureMoments()
    moments.update(features)
    return moments.statistics()


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigen-decomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """d² = ‖μ1 − μ2‖² + tr(C1 + C2 − 2·(C1·C2)^½), the Fréchet distance of two Gaussians (Dowson & Landau 1982).

    (C1·C2)^½ has the eigenvalues of the symmetric PSD matrix C1^½·C2·C1^½, so its trace is the sum
    of their square roots: two symmetric eigen-decompositions in float64, no general matrix square
    root (whose round-off gives FID implementations complex parts to discard).
    """
    mean1, cov1, mean2, cov2 = (t.to(torch.float64) for t in (mean1, cov1, mean2, cov2))
    root1 = _psd_sqrt(cov1)
    product = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


class ClassMeans:
    """Streaming per-class mean images (float64 sums), average-pooled to cells of `cell`×`cell` pixels."""

    def __init__(self, num_classes: int, cell: int = 4) -> None:
        self.num_classes, self.cell = num_classes, cell
        self.total: Tensor | None = None
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, images: Tensor, labels: Tensor) -> None:
        """images: N×C×H×W in [0, 1]; labels: (N,) class indices."""
        pooled = F.avg_pool2d(images.detach().to("cpu", torch.float64), self.cell)
        if self.total is None:
            self.total = torch.zeros(self.num_classes, *pooled.shape[1:], dtype=torch.float64)
        self.total.index_add_(0, labels.cpu(), pooled)
        self.counts += torch.bincount(labels.cpu(), minlength=self.num_classes).double()

    def means(self) -> Tensor:
        """K×C×h×w per-class means (NaN for a class without images)."""
        counts = self.counts.reshape(-1, 1, 1, 1)
        return torch.where(counts > 0, self.total / counts.clamp(min=1), float("nan"))


def _correlation(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-12))


def class_mean_agreement(real: Tensor, generated: Tensor) -> dict[str, float]:
    """How far the generated images' per-class means reproduce what sets each real class apart.

    Both are K×C×h×w per-class mean images (:class:`ClassMeans`); classes missing from either are
    left out. What every class shares is removed first, so agreement is about class differences:
    - ``colour``: correlation of the per-class mean colours, as deviations from the all-class mean;
    - ``layout``: per class, the correlation of the mean brightness pattern with the class's own
      mean brightness and the all-class pattern removed (sky above, ground below, an object in the
      middle...), averaged over classes. Both are 1 for a perfect match and about 0 for none.
    """
    present = ~(real.flatten(1).isnan().any(1) | generated.flatten(1).isnan().any(1))
    real, generated = real[present], generated[present]
    colours = [m.mean((2, 3)) for m in (real, generated)]
    colour = _correlation(*(c - c.mean(0) for c in colours))
    patterns = [m.mean(1) for m in (real, generated)]  # K×h×w brightness
    patterns = [p - p.mean((1, 2), keepdim=True) for p in patterns]
    patterns = [p - p.mean(0) for p in patterns]
    layout = sum(_correlation(r, g) for r, g in zip(*patterns, strict=True)) / len(real)
    return {"colour": colour, "layout": layout}


def conditional_accuracy(predicted: Tensor, conditioning: Tensor, num_classes: int) -> tuple[float, Tensor]:
    """The share of generated images classified as their conditioning class: overall, and per class
    (NaN for a class without images)."""
    hits = (predicted == conditioning).double()
    per_class_hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, conditioning.cpu(), hits.cpu())
    per_class_counts = torch.bincount(conditioning.cpu(), minlength=num_classes).double()
    per_class = torch.where(per_class_counts > 0, per_class_hits / per_class_counts.clamp(min=1), float("nan"))
    return float(hits.mean()), per_class


def inception_feature_network(state_dict: dict[str, Tensor]) -> nn.Module:
    """torchvision's Inception-v3 with `state_dict` loaded, returning the 2048-d pool features FID uses.

    Raises RuntimeError when the weights do not fit the architecture. With or without the auxiliary
    classifier's weights.
    """
    from torchvision.models import inception_v3

    auxiliary = any(key.startswith("AuxLogits.") for key in state_dict)
    network = inception_v3(weights=None, aux_logits=auxiliary, init_weights=False, transform_input=False)
    network.load_state_dict(state_dict)
    network.fc = nn.Identity()
    return network.eval()


def inception_features(network: nn.Module, images: Tensor) -> Tensor:
    """Pool features of [0, 1] NCHW images, resized to 299×299 and scaled to [−1, 1] as the weights expect.

    (torchvision's `transform_input` maps ImageNet-normalised input to the same [−1, 1] scale.)
    """
    resized = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return network(2 * resized - 1)


# --- Coverage (k-NN precision and recall) and memorisation -------------------------------------------------

DISTANCE_CHUNK = 1024  # rows per distance block: a block is at most DISTANCE_CHUNK² float64 values (8 MiB)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """All squared Euclidean distances between the rows of a (m, D) and b (n, D), float64:
    ‖a‖² + ‖b‖² − 2·a·bᵀ, one matrix product; float64 keeps the cancellation error near 1e-16·‖a‖²."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_(min=0)


def knn_radii(features: Tensor, k: int = 3, *, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """Distance from each row of `features` (N, D) to its k-th nearest other row, float64 (N,).

    The ball of that radius around each sample is its share of the estimated manifold (Kynkäänniemi
    et al. 2019, §2). A sample's distance to itself is the smallest of its row, so the k-th neighbour
    is the (k+1)-th smallest; an exact duplicate counts as a neighbour at distance 0.
    """
    features = features.flatten(1)
    if not 1 <= k < len(features):
        raise ValueError(f"k-NN radii need 1 <= k < the number of samples ({len(features)}), got k = {k}")
    radii = [_squared_distances(block, features).kthvalue(k + 1, dim=1).values
             for block in features.split(chunk)]
    return torch.cat(radii).sqrt()


def inside_manifold(queries: Tensor, reference: Tensor, radii: Tensor, *, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """Per query row, whether it lies in the union of the balls B(reference_i, radii_i) (boundary included)."""
    queries, reference = queries.flatten(1), reference.flatten(1)
    radii_sq = radii.to(torch.float64).square()
    blocks = []
    for block in queries.split(chunk):
        inside = torch.zeros(len(block), dtype=torch.bool)
        for start in range(0, len(reference), chunk):
            distances = _squared_distances(block, reference[start:start + chunk])
            inside |= (distances <= radii_sq[start:start + chunk]).any(dim=1)
        blocks.append(inside)
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.bool)


def knn_precision_recall(real: Tensor, generated: Tensor, k: int = 3, *,
                         chunk: int = DISTANCE_CHUNK) -> dict[str, float]:
    """k-NN manifold precision and recall of generated samples (Kynkäänniemi et al. 2019, eq. 1–2).

    `real` (N, D) and `generated` (M, D) are feature vectors (any space; images are flattened). Each set's
    manifold is the union of balls around its samples with radius the distance to the k-th nearest
    neighbour in the same set (k = 3, as the paper). Precision: the share of generated samples inside the
    real manifold (are they realistic?); recall: the share of real samples inside the generated manifold
    (is the real variety covered?). Both are 1 for identical sets and 0 for sets far apart.
    """
    real, generated = real.flatten(1), generated.flatten(1)
    precision = inside_manifold(generated, real, knn_radii(real, k, chunk=chunk), chunk=chunk)
    recall = inside_manifold(real, generated, knn_radii(generated, k, chunk=chunk), chunk=chunk)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


class NearestNeighbours:
    """Distance (float64) and index of each query's nearest reference row, the reference set streamed in
    chunks through `update` (e.g. read from a memory-mapped store), queries in blocks of `chunk` rows."""

    def __init__(self, queries: Tensor, *, chunk: int = DISTANCE_CHUNK) -> None:
        self.queries, self.chunk = queries.flatten(1), chunk
        self.squared = torch.full((len(self.queries),), float("inf"), dtype=torch.float64)
        self.indices = torch.full((len(self.queries),), -1, dtype=torch.long)
        self.seen = 0

    def update(self, reference: Tensor) -> None:
        reference = reference.flatten(1)
        for start in range(0, len(self.queries), self.chunk):
            rows = slice(start, start + self.chunk)
            best, where = _squared_distances(self.queries[rows], reference).min(dim=1)
            closer = best < self.squared[rows]  # ties keep the earlier reference row
            self.squared[rows] = torch.where(closer, best, self.squared[rows])
            self.indices[rows] = torch.where(closer, where + self.seen, self.indices[rows])
        self.seen += len(reference)

    @property
    def distances(self) -> Tensor:
        if self.seen == 0:
            raise ValueError("no reference rows seen yet")
        return self.squared.sqrt()


def memorisation_threshold(calibration_distances: Tensor, quantile: float = 0.01) -> float:
    """The memorisation threshold: the `quantile` of real images' nearest-training-image distances.

    `calibration_distances` are those distances for real images the generator did not train on (e.g.
    test or validation images); the lower order statistic is used, so on that set about `quantile` of
    the images fall at or below it. A generated set then "memorises" more than real data would when its
    rate is clearly above `quantile`.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be between 0 and 1 (exclusive), got {quantile}")
    if len(calibration_distances) == 0:
        raise ValueError("the memorisation threshold needs at least one calibration distance")
    return float(torch.quantile(calibration_distances.to(torch.float64), quantile, interpolation="lower"))


def memorisation(generated_distances: Tensor, calibration_distances: Tensor,
                 quantile: float = 0.01) -> dict[str, float]:
    """Nearest-real-neighbour memorisation rate: the share of generated images whose nearest training
    image is at most as far as the calibrated threshold (`memorisation_threshold`).

    Space: pixels. Distances are Euclidean between flattened [0, 1] images (`NearestNeighbours` over the
    training images), because copying is a pixel-level fact: in a classifier's feature space any typical
    image of a class lies near some training image of that class. Calibration: the threshold is the
    `quantile` of the same distances for held-out real images, so real data scores about `quantile` by
    construction and the rate needs no hand-set pixel distance. Use calibration images other than those of
    a held-out control set, or the control scores `quantile` by construction rather than by measurement.
    """
    threshold = memorisation_threshold(calibration_distances, quantile)
    rate = float((generated_distances.to(torch.float64) <= threshold).double().mean())
    return {"rate": rate, "threshold": threshold, "quantile": quantile}
