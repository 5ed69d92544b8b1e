"""`generate`: class-conditional samples from the EMA denoiser into the canonical store data/synthetic.

`generate.per_class` images for every class, sorted by class, written straight into a pre-allocated
memory-mapped store (millions of images never sit in RAM). Each image's initial noise depends only
on (seed, class, index), and the network always sees batches of `network_batch` images in float32
without TF32 (or the recorded precision) with deterministic cuDNN algorithms, so on one machine (one CPU
or GPU model, one software stack) the store is byte-identical whatever `generate.batch_size` and whatever
the number of processes sharing the work (torchrun ranks, or the worker processes a plain CPU run
starts by itself, one per core). Another GPU model or cuDNN version may change the last bits of the
images. Churn noise, when asked for, is per image too. Optionally:
classifier-free guidance (`generate.guidance`, for denoisers trained with label dropout), and the
reference recipe's filter (Wang et al. 2023, `select_1M`): per_class / filter_keep candidates per class,
of which the `filter_keep` share with the highest probability of their conditioning class under
`filter_scorer` is kept: `reference` (the standard classifier of train_reference, as the paper) or the
path of another DMAT classifier checkpoint.

With `generate.source: external` nothing is sampled: the files `generate.external` names (the reference's
published `.npz` sets, whole or in parts, an image folder or another DMAT store) are streamed into
data/synthetic, sorted by class, with every source file's path, size and sha256 in its metadata
(`dmat.data.external`); the filter then keeps the `filter_keep` share of each class. DVC reruns the stage
when those files change through the record `fetch_generated` writes.

Also writes metrics/generate.json and plots/generate_grid.png (a `dvc plots` image).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import ClassifierHeaders, load_denoiser, load_reference_classifier, load_scoring_classifier
from dmat.artifacts.records import DiffusionHeader
from dmat.config import Params, ParamsError
from dmat.core.guidance import GuidedDenoiser
from dmat.core.precision import (
    Autocast,
    Decision,
    Setting,
    exact_kernels,
    full_precision,
    network_passes,
    to_memory_format,
)
from dmat.core.samplers import SAMPLERS, Churn, edm_sigma_steps, image_noise, per_image_randn_like, to_uint8
from dmat.data.external import ExternalSet
from dmat.data.store import ArrayStore, StoreWriter, allocate_store, seal_store, write_block
from dmat.data.tensors import to_unit_tensor
from dmat.distributed import World, barrier, broadcast_object, world
from dmat.errors import DataError
from dmat.files import atomic_path, in_project, sha256_file, write_json
from dmat.plots import image_grid, save_png
from dmat.stage_setup import apply_torch, check_precision, choose_setting, log_precision
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads
GRID_PER_CLASS = 10
# metrics/generate.json (each as generate_<key>); the rest of the metrics go to the report
HEADLINE = ("images", "nfe", "guidance", "seconds", "images_per_s", "precision", "memory_format")


class FixedBatchDenoiser(torch.nn.Module):
    """Evaluates the wrapped denoiser in chunks of exactly `size` images, padding the last one.

    Per-image results of a network can depend on the batch shape (the kernels chosen differ), so a
    fixed shape keeps every image independent of the sampler's batch size and of the process count.
    """

    def __init__(self, denoiser: torch.nn.Module, size: int):
        super().__init__()
        self.denoiser, self.size = denoiser, size

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, len(x), self.size):
            chunk = slice(start, start + self.size)
            n = len(x[chunk])
            pad = self.size - n
            xs, ss, ys = x[chunk], sigma[chunk], labels[chunk]
            if pad:
                xs = torch.cat([xs, xs[:1].expand(pad, *xs.shape[1:])])
                ss, ys = torch.cat([ss, ss[:1].expand(pad)]), torch.cat([ys, ys[:1].expand(pad)])
            outputs.append(self.denoiser(xs, ss, ys)[:n])
        return torch.cat(outputs)


def sampling_network(denoiser: torch.nn.Module, state: DiffusionHeader, params: Params, setting: Setting,
                     device: str) -> torch.nn.Module:
    """The denoiser as the sampler calls it: in `setting` (precision and memory format), in fixed-size
    chunks, with classifier-free guidance if asked. The sampler's own arithmetic stays float64."""
    cfg = params.generate
    network = FixedBatchDenoiser(Autocast(to_memory_format(denoiser, setting), setting, device), cfg.network_batch)
    if cfg.guidance == 1:
        return network
    config = state.model_config
    if not config.label_dropout:
        raise ParamsError(f"generate.guidance = {cfg.guidance:g} is not allowed with this denoiser: guidance needs "
                          "the unconditional denoiser that label dropout trains, and "
                          f"{layout.DIFFUSION_CHECKPOINT} was trained with "
                          "train_diffusion.label_dropout = 0")
    interval = (0.0, math.inf) if cfg.guidance_interval is None else tuple(cfg.guidance_interval)
    return GuidedDenoiser(network, cfg.guidance, null_label=config.num_classes, interval=interval)


@exact_kernels()
def sample(denoiser: torch.nn.Module, params: Params, classes: np.ndarray, indices: np.ndarray,
           shape: tuple[int, int, int], device: str) -> np.ndarray:
    """uint8 N×H×W×C samples for (class, index) pairs; each depends only on its own pair and the seed (TF32
    off, deterministic cuDNN: whatever a training stage set in this process)."""
    cfg = params.generate
    pairs = zip(classes.tolist(), indices.tolist(), strict=True)
    noise = torch.cat([image_noise(params.base.seed, c, [i], shape) for c, i in pairs])
    sigmas = edm_sigma_steps(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(device)
    churn = Churn(s_churn=cfg.s_churn, s_min=cfg.s_min, s_max=math.inf if cfg.s_max is None else cfg.s_max,
                  s_noise=cfg.s_noise)
    images = SAMPLERS[cfg.sampler](
        denoiser, noise.to(device), torch.from_numpy(classes).to(device), sigmas, churn=churn,
        randn_like=per_image_randn_like(params.base.seed, classes.tolist(), indices.tolist()))
    return to_uint8(images).cpu().numpy()


def network_evaluations(cfg) -> int:
    """Denoiser evaluations per image (without churn): Heun 2·steps − 1, Euler steps, plus one
    unconditional evaluation at each σ inside the guidance interval."""
    sigmas = edm_sigma_steps(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    evaluated = torch.cat([sigmas[:-1], sigmas[1:-1]]) if cfg.sampler == "heun" else sigmas[:-1]
    if cfg.guidance == 1:
        return len(evaluated)
    low, high = cfg.guidance_interval or (0.0, math.inf)
    return len(evaluated) + int(((evaluated > low) & (evaluated <= high)).sum())


def candidates_per_class(params: Params) -> int:
    cfg = params.generate
    return cfg.per_class if cfg.filter_keep >= 1 else math.ceil(cfg.per_class / cfg.filter_keep)


def fill_store(store_dir: Path, denoiser, params: Params, w: World, per_class: int, num_classes: int,
               shape: tuple[int, int, int]) -> None:
    """Generate this rank's rows of a class-sorted store whose arrays rank 0 pre-allocated in store_dir."""
    rows = np.array_split(np.arange(per_class * num_classes), w.size)[w.rank]  # contiguous per rank
    batch = params.generate.batch_size
    with tqdm(total=len(rows), desc="generate", unit="img", disable=not w.is_main, mininterval=2) as progress:
        for start in range(0, len(rows), batch):
            block = rows[start:start + batch]
            classes, indices = block // per_class, block % per_class
            write_block(store_dir, int(block[0]), sample(denoiser, params, classes, indices, shape, w.device), classes)
            progress.update(len(block) * w.size)


def local_workers(params: Params, w: World, total: int) -> int:
    """CPU processes a plain (non-torchrun) run spreads its rows over: `generate.workers`, or one per
    available core, and never more than there are batches."""
    if w.size > 1 or w.device != "cpu":
        return 1
    workers = params.generate.workers or available_cores()
    return max(1, min(workers, math.ceil(total / params.generate.batch_size)))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one, as on Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fill_store_locally(store_dir: Path, network: torch.nn.Module, params: Params, w: World, per_class: int,
                       num_classes: int, shape: tuple[int, int, int], setting: Setting) -> None:
    """This rank's rows; on a CPU outside torchrun, shared with spawned worker processes (the shards
    are those of torchrun ranks, and every worker uses the parent's `setting`, so the store is the
    same either way)."""
    workers = local_workers(params, w, per_class * num_classes)
    if workers == 1:
        fill_store(store_dir, network, params, w, per_class, num_classes, shape)
        return
    with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        shards = [pool.submit(_fill_shard, store_dir, params, World(rank, workers, w.device), per_class,
                              num_classes, shape, setting) for rank in range(1, workers)]
        fill_store(store_dir, network, params, World(0, workers, w.device), per_class, num_classes, shape)
        for shard in shards:
            shard.result()


def _fill_shard(store_dir: Path, params: Params, w: World, per_class: int, num_classes: int,
                shape: tuple[int, int, int], setting: Setting) -> None:
    """A spawned worker's share of the store (its own denoiser, one thread, the parent's setting)."""
    _configure_torch(params)
    denoiser, state = load_denoiser(device=w.device)
    network = sampling_network(denoiser, state, params, setting, w.device)
    fill_store(store_dir, network, params, w, per_class, num_classes, shape)


def probe_passes(denoiser: torch.nn.Module, params: Params, shape: tuple[int, int, int], device: str):
    """Forward passes (no gradients) of the denoiser at the network batch, for the `auto` probe."""
    n = params.generate.network_batch
    inputs = (torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)), torch.ones(n),
              torch.zeros(n, dtype=torch.int64))
    return network_passes(denoiser, [t.to(device) for t in inputs], device, backward=False)


def _configure_torch(params: Params) -> str:
    device = apply_torch(params.base)
    if device == "cpu" and not params.base.threads:
        # Kernels chosen for a CPU convolution depend on the thread count, which changes the last bits
        # of the images: one thread per process keeps the store identical for any process count.
        torch.set_num_threads(1)
    return device


def load_scorer(params: Params, device: str) -> tuple[torch.nn.Module, ClassifierHeaders, Path]:
    """The filter's scorer: `reference` is models/reference/best.pt, anything else a DMAT classifier checkpoint."""
    name = params.generate.filter_scorer
    if name == "reference":
        return (*load_reference_classifier(layout.REFERENCE_BEST, device), layout.REFERENCE_BEST)
    return (*load_scoring_classifier(name, device), Path(name))


@full_precision()
@torch.no_grad()
def conditioning_confidence(scorer: torch.nn.Module, candidates: ArrayStore, batch_size: int,
                            device: str) -> np.ndarray:
    """Per candidate, the scorer's softmax probability of the class it was generated for (float64; the scorer
    in float32, TF32 and autocast off)."""
    confidence = np.empty(len(candidates))
    for start in range(0, len(candidates), batch_size):
        rows = np.arange(start, min(start + batch_size, len(candidates)))
        images, labels = candidates.read(rows)
        probs = scorer(to_unit_tensor(images, device)).double().softmax(1).cpu().numpy()
        confidence[rows] = probs[np.arange(len(rows)), labels]
    return confidence


def top_per_class(confidence: np.ndarray, labels: np.ndarray, keep: int | np.ndarray) -> np.ndarray:
    """Rows (ascending) of the `keep` most confident candidates of every class (`keep`: one count for all, or one
    per class index); ties keep the earlier row."""
    kept = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        kept.append(rows[np.argsort(-confidence[rows], kind="stable")[:int(keep[c] if np.ndim(keep) else keep)]])
    return np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)


def run(params: Params) -> dict:
    device = _configure_torch(params)
    if params.generate.source == "external":
        return run_external(params, device)
    check_precision(params.base, device)
    with world(device) as w:
        denoiser, state = load_denoiser(device=w.device)
        classes, config = list(state.classes), state.model_config
        shape = (config.in_channels, config.img_resolution, config.img_resolution)
        # Decided once (rank 0, in the parent of any workers): the setting changes the images' last bits. Timed
        # with the kernels that sampling uses.
        workload = {"stage": STAGE, "network": config.name, "batch": params.generate.network_batch,
                    "image_shape": list(shape)}
        with exact_kernels():
            decision = choose_setting(params.base, w, lambda: probe_passes(denoiser, params, shape, w.device),
                                      workload=workload)
        network = sampling_network(denoiser, state, params, decision.setting, w.device)
        per_class = candidates_per_class(params)
        scorer = load_scorer(params, w.device) if w.is_main and params.generate.filter_keep < 1 else None
        if scorer is not None and list(scorer[1].classes) != classes:  # before hours of sampling
            raise DataError(f"{scorer[2]}: the scorer's classes {list(scorer[1].classes)} differ from the diffusion "
                            f"model's {classes} (generate.filter_scorer)")
        with stage_run(STAGE, params, SECTIONS, enabled=w.is_main) as tracked:
            tracked.set_tags({"dmat.diffusion_run_id": state.mlflow_run_id or "",
                              "dmat.adversarial_mode": state.adversarial["mode"]})
            log_precision(tracked, decision)
            started = time.perf_counter()
            filtered = _generate(network, params, w, classes, per_class, shape, diffusion_recipe(state), scorer,
                                 decision)
            seconds = time.perf_counter() - started
            if not w.is_main:
                return {}
            store = ArrayStore.open(layout.SYNTHETIC_DIR)
            cfg = params.generate
            metrics = {"images": len(store), "per_class": cfg.per_class, "candidates_per_class": per_class,
                       "sampler": cfg.sampler, "steps": cfg.steps,
                       "nfe": network_evaluations(cfg), "guidance": cfg.guidance,
                       "seconds": seconds, "images_per_s": per_class * len(classes) / max(seconds, 1e-9),
                       "sha256": store.digest, "adversarial_mode": state.adversarial["mode"],
                       "filter": filtered, **decision.summary()}
            report(tracked, store, metrics)
    return metrics


def run_external(params: Params, device: str) -> dict:
    """generate.source external: the files generate.external names, streamed into a class-sorted data/synthetic
    with the dataset's classes and image size (those of data/real/train), then filtered like samples when asked
    (filter_keep: the share of each class kept)."""
    cfg = params.generate
    real = ArrayStore.open(layout.REAL_TRAIN)
    paths = [in_project(path) for path in cfg.external]
    filtering = cfg.filter_keep < 1
    scorer = load_scorer(params, device) if filtering else None
    if scorer is not None and list(scorer[1].classes) != list(real.classes):
        raise DataError(f"{scorer[2]}: the scorer's classes {list(scorer[1].classes)} differ from "
                        f"{layout.REAL_TRAIN}'s {list(real.classes)} (generate.filter_scorer)")
    started = time.perf_counter()
    external = ExternalSet(paths, real.classes, real.image_shape)  # every file checked before anything is written
    with stage_run(STAGE, params, SECTIONS) as tracked:
        with atomic_path(layout.SYNTHETIC_DIR, directory=True) as staging:
            fill_dir = staging / "candidates" if filtering else staging
            fill_dir.mkdir(exist_ok=True)
            source = external.write(fill_dir, extra={"filter_keep": cfg.filter_keep})
            filtered = None
            if filtering:
                candidates = ArrayStore.open(fill_dir)
                keep = np.rint(np.asarray(candidates.meta.class_counts) * cfg.filter_keep).astype(np.int64)
                filtered = _keep_most_confident(candidates, params, staging, source, scorer, device, keep)
                del candidates
                shutil.rmtree(fill_dir)
        seconds = time.perf_counter() - started
        store = ArrayStore.open(layout.SYNTHETIC_DIR)
        metrics = {"images": len(store), "source": "external", "format": source["format"], "files": source["files"],
                   "seconds": seconds, "images_per_s": source["images"] / max(seconds, 1e-9), "sha256": store.digest,
                   "filter": filtered}
        for file in source["files"]:  # lineage in MLflow: the run's inputs are the files read, by sha256
            tracked.log_dataset(f"external/{Path(file['path']).name}", file["path"], file["sha256"], "source",
                                size=file["size"], images=file["images"])
        tracked.set_tags({"dmat.generated_source": "external"})
        report(tracked, store, metrics)
    return metrics


def report(tracked, store: ArrayStore, metrics: dict) -> None:
    """The report, the headline metrics, the sample grid and the MLflow record of a finished data/synthetic."""
    write_json(layout.report_file(STAGE), metrics)
    write_json(layout.metrics_file(STAGE), {f"generate_{k}": metrics[k] for k in HEADLINE if k in metrics})
    save_png(layout.GENERATE_GRID, image_grid(grid_images(store), columns=grid_columns(store)), scale=2)
    tracked.log_store(store, "synthetic", context="generated")
    tracked.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)}
                        | {f"filter.{k}": v for k, v in (metrics["filter"] or {}).items() if isinstance(v, float)})
    tracked.log_artifact(layout.GENERATE_GRID)
    tracked.log_artifact(layout.report_file(STAGE))


def diffusion_recipe(state: DiffusionHeader) -> dict:
    """What the generated store records about the model that made it (for lineage and run comparison)."""
    return {"model": state.model_config.name, "train_steps": state.step,
            "adversarial": state.adversarial, "corrupt": state.train_config.get("corrupt"),
            "mlflow_run_id": state.mlflow_run_id, "checkpoint_sha256": sha256_file(layout.DIFFUSION_CHECKPOINT)}


def _generate(denoiser, params: Params, w: World, classes: list[str], per_class: int,
              shape: tuple[int, int, int], diffusion: dict, scorer: tuple | None, decision: Decision) -> dict | None:
    """All ranks fill one pre-allocated store in place; rank 0 seals it (after filtering, when asked)
    and publishes it at data/synthetic in one rename. Returns what the filter did (rank 0, when filtering)."""
    hwc = (shape[1], shape[2], shape[0])
    cfg = params.generate
    filtering = cfg.filter_keep < 1
    source = {"kind": "generated", "sampler": cfg.sampler, "steps": cfg.steps, "seed": params.base.seed,
              "filter_keep": cfg.filter_keep, "guidance": cfg.guidance, "guidance_interval": cfg.guidance_interval,
              "precision": decision.setting.precision, "memory_format": decision.setting.memory_format,
              "diffusion": diffusion}
    with atomic_path(layout.SYNTHETIC_DIR, directory=True) if w.is_main else contextlib.nullcontext() as staging:
        fill_dir = broadcast_object(w, str(staging / "candidates" if filtering else staging) if w.is_main else None)
        fill_dir = Path(fill_dir)
        if w.is_main:
            fill_dir.mkdir(exist_ok=True)
            allocate_store(fill_dir, per_class * len(classes), hwc)
        barrier(w)
        fill_store_locally(fill_dir, denoiser, params, w, per_class, len(classes), shape, decision.setting)
        barrier(w)
        if not w.is_main:
            return None
        seal_store(fill_dir, classes, source)
        if not filtering:
            return None
        filtered = _keep_most_confident(ArrayStore.open(fill_dir), params, staging, source, scorer, w.device,
                                        params.generate.per_class)
        shutil.rmtree(fill_dir)
        return filtered


def _keep_most_confident(candidates: ArrayStore, params: Params, out: Path, source: dict, scorer: tuple,
                         device: str, keep: int | np.ndarray) -> dict:
    """Write the `keep` most confident candidates of each class into `out` (in candidate order, so still sorted by
    class); returns a summary."""
    model, state, path = scorer
    confidence = conditioning_confidence(model, candidates, params.generate.batch_size, device)
    rows = top_per_class(confidence, np.asarray(candidates.labels), keep)
    summary = {"scorer": params.generate.filter_scorer, "scorer_format": state.format,
               "scorer_model": state.model_config.name, "scorer_sha256": sha256_file(path),
               "candidates": len(candidates), "kept": len(rows),
               "mean_confidence_candidates": float(confidence.mean()), "mean_confidence_kept": float(
                   confidence[rows].mean())}
    writer = StoreWriter(out, len(rows), candidates.image_shape, candidates.classes)
    for start in range(0, len(rows), 4096):
        images, labels = candidates.read(rows[start:start + 4096])
        writer.write(slice(start, start + len(images)), images, labels)
    writer.finish({**source, "filter": summary})
    return summary


def grid_columns(store: ArrayStore) -> int:
    return max(1, min(GRID_PER_CLASS, max(store.meta.class_counts)))


def grid_images(store: ArrayStore) -> np.ndarray:
    """The first images of every class, one row per class (white where a class has fewer): the store is sorted by
    class, its class counts say where each class starts."""
    columns, counts = grid_columns(store), store.meta.class_counts
    cells = np.full((len(counts) * columns, *store.image_shape), 255, dtype=np.uint8)
    for c, start in enumerate(np.concatenate([[0], np.cumsum(counts)[:-1]])):
        shown = min(columns, counts[c])
        cells[c * columns:c * columns + shown] = store.read(start + np.arange(shown))[0]
    return cells
