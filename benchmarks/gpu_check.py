"""GPU acceptance check of the paper-scale path: run it once on a machine with a CUDA GPU (`make gpu-check`).

At most about 8 minutes on one H100. Prints one JSON document (also written to --out), one entry per check with
`passed` and its figures; exit 0 when every check that ran passed, 1 otherwise. Checks:

- collectives: a process group through DMAT's own `world` (one process per GPU: `cpu:gloo,cuda:nccl`, so NCCL
  carries the tensors), every collective wrapper on the GPU, and the wrappers refusing a CPU tensor;
- ddp_steps: one optimiser step (two micro-batches, the non-last under `no_sync`) of TRADES, PGD-AT and adversarial
  DDPM++ through `training_network` under DDP, in fp32, bf16 + channels-last and fp16 with loss scaling: losses
  finite, parameters move, DDP gradients equal the single-process step's (relative L2 difference within 1e-4 in
  fp32, 1e-2 in bf16/fp16);
- cpu_vs_gpu: float32 (TF32 off) agreement of a WRN-16-4's logits (relative L2 within 1e-4), its input gradients
  (within 1e-3) and a DDPM++ Heun trajectory (largest difference within 2e-3 in [-1, 1] units);
- determinism: `generate`'s sampling twice, in different batch sizes and after a training step turned TF32 and
  cuDNN autotuning on, byte for byte; AutoAttack (APGD-CE, APGD-T) twice on the same points, bit for bit;
- throughput: WRN-28-10 TRADES-10 at batch 512 (the paper profile's micro-batch) in fp32 (TF32) and bf16 +
  channels-last: seconds per step, images/s, TFLOP/s (FLOPs counted as `bench_train` does) and peak memory;
- diffusion_memory: adversarial DDPM++ peak memory per micro-batch (32, 64, 128 images, fp32), bytes per image
  against the CPU measurement (`bench_memory`), and the paper profile's micro-batch against 80 GB;
- stages: a tiny pipeline (prepare, train-reference, train-diffusion, generate, mix, train, evaluate) where each
  multi-process stage runs under torchrun (one process per GPU, at most 2): the first-epoch collectives, pinned
  copies and buffer broadcasts of the real stages.

Without CUDA it runs a dry run (`--dry-run` forces one): collectives (gloo), ddp_steps in fp32 and bf16 with small
networks (wrn-16-1, unet-tiny), determinism and stages on the CPU; it skips fp16, cpu_vs_gpu, throughput and
diffusion_memory, which need a GPU, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_memory import GPU_MEMORY_GB, RESULTS, paper_params
from benchmarks.measure import machine
from dmat.config import parse_params
from dmat.core.classifiers import DATASET_STATS, build_classifier
from dmat.core.denoisers import build_denoiser
from dmat.core.ema import WeightAverage
from dmat.core.precision import Autocast, Decision, Setting, full_precision, unsupported
from dmat.core.robustness import EvaluationSettings, evaluate_robustness
from dmat.core.samplers import edm_sigma_steps, heun_sampler, image_noise
from dmat.data.sampler import BatchPlan
from dmat.data.store import write_store
from dmat.distributed import World, all_gather_rows, all_reduce_sum, barrier, broadcast_buffers, broadcast_object, world
from dmat.stage_setup import training_network
from dmat.stages import generate
from dmat.stages.train import Trainer
from dmat.stages.train_diffusion import DiffusionTrainer, at_config

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}  # DDP vs one process: relative L2 of the gradients
SETTINGS = {"fp32": Setting("fp32", "contiguous"), "bf16": Setting("bf16", "channels_last"),
            "fp16": Setting("fp16", "contiguous")}


# --- helpers ----------------------------------------------------------------------------------------------------


def checked(fn: Callable[..., dict]) -> Callable[..., dict]:
    """A check's figures with its seconds; an exception is a failed check that names it."""
    def run(*args) -> dict:
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - a failed check is reported, the others still run
            result = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        return {**result, "seconds": round(time.perf_counter() - started, 1)}

    return run


@contextlib.contextmanager
def one_process_group(device: str) -> Iterator[World]:
    """DMAT's own world as torchrun would set it up for one process: a real process group (NCCL on a GPU)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with world(device) as w:
            yield w
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu().flatten(), b.double().cpu().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def classifier(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    mean, std = DATASET_STATS["cifar10"]
    return build_classifier(name, num_classes=10, mean=mean, std=std).to(device)


def denoiser(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser(name, img_resolution=32, in_channels=3, num_classes=10).to(device)


def cifar_like(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=generator).to(device), (torch.arange(n) % 10).to(device)


def classifier_trainer(model, network, scaler, loss: str, micro_batch: int | None, attack_steps: int = 10):
    """What `train`'s Trainer.step reads of its trainer."""
    params = parse_params({"train": {"loss": loss, "micro_batch": micro_batch, "attack": {"steps": attack_steps}}})
    return SimpleNamespace(cfg=params.train, trained=network, scaler=scaler,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True))


def diffusion_trainer(model, network, scaler, w: World, batch: int, micro_batch: int | None, store_dir: Path):
    """What `train_diffusion`'s DiffusionTrainer.train_step reads of its trainer: a store of `batch` random images,
    adversarial mode on every image (the paper's fraction 1)."""
    params = parse_params({"base": {"seed": 0}, "train_diffusion": {
        "batch_size": batch, "micro_batch": micro_batch, "augment": True,
        "adversarial": {"mode": "adversarial", "fraction": 1.0}}})
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    store = write_store(store_dir / f"store-{batch}", images, np.arange(batch) % 10, [str(c) for c in range(10)], {})
    return SimpleNamespace(cfg=params.train_diffusion, params=params, world=w, real=store, at=at_config(params),
                           plan=lambda step: BatchPlan(np.arange(batch), np.empty(0, np.int64)),
                           corrupted=np.zeros(batch, bool), trained=network, model=model, ema=WeightAverage(model),
                           optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), step=0, scaler=scaler)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- checks -----------------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    info = {"passed": True, "device": device, "machine": machine()}
    if torch.device(device).type == "cuda":
        info |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "gpus": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability()),
                 "native_bf16": unsupported(device, "bf16") is None,
                 "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)}
    return info


def collectives(w: World) -> dict:
    import torch.distributed as dist

    values = torch.arange(4.0, device=w.device)
    rows = torch.rand(5, 4, device=w.device)
    net = torch.nn.BatchNorm2d(3).to(w.device)
    found = {"backend": str(dist.get_backend()), "device": w.device,
             "all_reduce_sum": bool(torch.equal(all_reduce_sum(w, values.clone()), values)),
             "all_gather_rows": bool(torch.equal(all_gather_rows(w, rows), rows)),
             "broadcast_object": broadcast_object(w, "rank 0") == "rank 0"}
    broadcast_buffers(w, net)
    barrier(w)
    if torch.device(w.device).type == "cuda":
        try:
            all_reduce_sum(w, torch.zeros(2))
            found["refuses_cpu_tensor"] = False
        except ValueError:
            found["refuses_cpu_tensor"] = True
    found["passed"] = all(v for k, v in found.items() if isinstance(v, bool)) and w.joined and (
        "nccl" in found["backend"] or torch.device(w.device).type != "cuda")
    return found


def ddp_step(w: World, loss: str, precision: str, small: bool, store_dir: Path) -> dict:
    """One optimiser step through DDP and the same step in one plain process, from the same weights and draws."""
    device, setting = w.device, SETTINGS[precision]
    diffusion = loss == "diffusion"
    name = ("unet-tiny" if small else "ddpmpp-cifar") if diffusion else ("wrn-16-1" if small else "wrn-16-4")
    base = denoiser(name, device) if diffusion else classifier(name, device)
    results = {}
    for label, step_world in (("ddp", w), ("single", World(0, 1, device))):
        model = copy.deepcopy(base)
        network, scaler = training_network(model, Decision(setting, "requested"), step_world, compile=False)
        start = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(1)  # dropout draws alike in both
        if diffusion:
            trainer = diffusion_trainer(model, network, scaler, step_world, 8, 4, store_dir)
            rows = DiffusionTrainer.train_step(trainer)
            finite = bool(rows[:, 1].isfinite().all())
        else:
            trainer = classifier_trainer(model, network, scaler, loss, micro_batch=8, attack_steps=3)
            x, y = cifar_like(16, device)
            totals = Trainer.step(trainer, x, y, torch.Generator().manual_seed(2))
            finite = bool(totals.isfinite().all())
        grads = flat_grads(model)
        for _ in range(2):  # fp16: the scaler may skip a first step that overflowed; the weights move after it
            if diffusion:
                DiffusionTrainer.train_step(trainer)
            else:
                Trainer.step(trainer, *cifar_like(16, device), torch.Generator().manual_seed(3))
        moved = any(not torch.equal(a, b.detach()) for a, b in zip(start, model.parameters(), strict=True))
        results[label] = {"finite": finite and bool(grads.isfinite().all()), "moved": moved, "grads": grads,
                          "ddp": isinstance(network.module, torch.nn.parallel.DistributedDataParallel)}
    difference = relative(results["ddp"]["grads"], results["single"]["grads"])
    return {"network": name, "ddp_wrapped": results["ddp"]["ddp"], "finite": results["ddp"]["finite"],
            "parameters_move": results["ddp"]["moved"], "grad_difference": difference,
            "passed": results["ddp"]["ddp"] and results["ddp"]["finite"] and results["ddp"]["moved"]
            and difference <= TOLERANCE[precision]}


def ddp_steps(w: World, small: bool) -> dict:
    on_cuda = torch.device(w.device).type == "cuda"
    precisions = ["fp32"] + [p for p in ("bf16", "fp16") if not unsupported(w.device, p)]
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loss in ("trades", "pgd-at", "diffusion"):
            for precision in precisions:
                found[f"{loss}_{precision}"] = checked(ddp_step)(w, loss, precision, small, Path(tmp))
    skipped = [] if on_cuda else ["fp16 (needs CUDA)"]
    return {"passed": all(r["passed"] for r in found.values()), "steps": found, "skipped": skipped}


def cpu_vs_gpu(device: str) -> dict:
    with full_precision():
        x, y = cifar_like(32, "cpu", seed=5)
        results = {}
        for where in ("cpu", device):
            model = classifier("wrn-16-4", where).eval()
            inputs = x.to(where).requires_grad_(True)
            logits = model(inputs)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y.to(where)), inputs)
            net = denoiser("ddpmpp-cifar", where).eval()
            noise = torch.cat([image_noise(0, c, [0], (3, 32, 32)) for c in range(4)]).to(where)
            with torch.no_grad():
                images = heun_sampler(net, noise, torch.arange(4, device=where), edm_sigma_steps(6).to(where))
            results[where] = (logits.detach().cpu(), grad.cpu(), images.cpu())
    (logits_c, grad_c, img_c), (logits_g, grad_g, img_g) = results["cpu"], results[device]
    found = {"logits_relative": relative(logits_g, logits_c), "input_grad_relative": relative(grad_g, grad_c),
             "heun_max_abs": float((img_g.double() - img_c.double()).abs().max())}
    found["passed"] = found["logits_relative"] <= 1e-4 and found["input_grad_relative"] <= 1e-3 \
        and found["heun_max_abs"] <= 2e-3
    return found


def determinism(device: str, small: bool) -> dict:
    params = parse_params({"base": {"seed": 0}, "generate": {"steps": 4, "network_batch": 8}})
    net = denoiser("unet-tiny" if small else "ddpmpp-cifar", device).eval()
    classes, indices = np.repeat(np.arange(4), 3), np.tile(np.arange(3), 4)

    def sample_all(setting: Setting, batch: int) -> bytes:
        network = generate.FixedBatchDenoiser(Autocast(net, setting, device), params.generate.network_batch)
        return b"".join(generate.sample(network, params, classes[i:i + batch], indices[i:i + batch], (3, 32, 32),
                                        device).tobytes() for i in range(0, len(classes), batch))

    found = {}
    for name in ("fp32", "bf16"):
        if unsupported(device, name):
            continue
        first = sample_all(SETTINGS[name], 12)
        other_batch = sample_all(SETTINGS[name], 5)
        training_network(classifier("wrn-16-1", device), Decision(Setting(), "requested"), World(0, 1, device),
                         compile=False)  # what a training stage leaves behind: TF32 and autotuning on
        after_training = sample_all(SETTINGS[name], 12)
        found[f"generate_{name}"] = first == other_batch == after_training
    model = classifier("wrn-16-1", device).eval()
    x, y = cifar_like(16 if small else 64, "cpu", seed=7)
    settings = EvaluationSettings(norm="Linf", eps=8 / 255, version="custom", seed=0, batch_size=32,
                                  attacks=("apgd-ce",) if small else ("apgd-ce", "apgd-t"), sweep=(4 / 255,),
                                  large_eps=0.5, sweep_steps=5)
    runs = [evaluate_robustness(model, x, y, [str(c) for c in range(10)], settings) for _ in range(2)]
    found["autoattack_x_adv"] = bool(torch.equal(runs[0][1], runs[1][1]))
    found["autoattack_report"] = _strip_times(runs[0][0]) == _strip_times(runs[1][0])
    return {**found, "passed": all(found.values())}


def _strip_times(report: dict) -> dict:
    return {k: _strip_times(v) if isinstance(v, dict) else v for k, v in report.items()
            if "second" not in k and not k.endswith("_s")}


def trades_flops(model: torch.nn.Module, batch: int, device: str) -> float:
    """FLOPs of a TRADES-10 step at `batch`, composed as bench_train does: 13 forwards and 7 full backwards."""
    x, y = cifar_like(8, device)
    with FlopCounterMode(display=False) as forward:
        loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return (13 * forward.get_total_flops() + 7 * backward.get_total_flops()) * batch / 8


def throughput(device: str) -> dict:
    profile = paper_params().train
    found = {}
    for name in ("fp32", "bf16"):
        if unsupported(device, name):
            continue
        model = classifier("wrn-28-10", device).train()
        flops = trades_flops(model, profile.batch_size, device)
        network, scaler = training_network(model, Decision(SETTINGS[name], "requested"), World(0, 1, device),
                                           compile=False)
        trainer = classifier_trainer(model, network, scaler, "trades", profile.micro_batch)
        x, y = cifar_like(profile.batch_size, device)
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            Trainer.step(trainer, x, y, generator)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        started, steps = time.perf_counter(), 4
        for _ in range(steps):
            Trainer.step(trainer, x, y, generator)
        synchronize(device)
        seconds = (time.perf_counter() - started) / steps
        found[f"wrn-28-10_trades10_{SETTINGS[name].name}"] = {
            "batch": profile.batch_size, "micro_batch": profile.micro_batch, "step_s": round(seconds, 3),
            "images_per_s": round(profile.batch_size / seconds, 1), "tflop_per_s": round(flops / seconds / 1e12, 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1)}
        del model, network, trainer
        torch.cuda.empty_cache()
    return {"passed": bool(found), **found}


def diffusion_memory(device: str) -> dict:
    profile = paper_params().train_diffusion
    measured = json.loads(RESULTS.read_text())["measured"]["train_diffusion"]
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch, micro in ((32, None), (64, None), (profile.micro_batch, None), (2 * profile.micro_batch,
                                                                                   profile.micro_batch)):
            model = denoiser("ddpmpp-cifar", device)
            network, scaler = training_network(model, Decision(SETTINGS["fp32"], "requested"), World(0, 1, device),
                                               compile=False)
            trainer = diffusion_trainer(model, network, scaler, World(0, 1, device), batch, micro, Path(tmp))
            DiffusionTrainer.train_step(trainer)  # cuDNN's autotuning and Adam's moments happen in the first step
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
            DiffusionTrainer.train_step(trainer)
            synchronize(device)
            peaks[f"batch_{batch}_micro_{micro or batch}"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            del model, network, trainer
            torch.cuda.empty_cache()
    per_image_mb = (peaks["batch_64_micro_64"] - peaks["batch_32_micro_32"]) * 1e9 / 32 / 2**20
    paper = peaks[f"batch_{profile.micro_batch}_micro_{profile.micro_batch}"]
    accumulated = peaks[f"batch_{2 * profile.micro_batch}_micro_{profile.micro_batch}"]
    return {"peak_gb": peaks, "mb_per_image_gpu": round(per_image_mb, 1), "mb_per_image_cpu": measured["mb_per_image"],
            "paper_micro_batch": profile.micro_batch, "paper_micro_batch_peak_gb": paper,
            "accumulation_keeps_the_micro_batch_peak": accumulated <= 1.1 * paper,
            "passed": paper <= GPU_MEMORY_GB and accumulated <= 1.1 * paper}


STAGE_PARAMS = """
base: {{seed: 0, device: {device}, nproc: {nproc}, precision: auto, memory_format: auto}}
data: {{name: tiny, path: {folder}, val_size: 12, train_limit: null, test_limit: null, heldout_size: 0}}
train_reference: {{epochs: 2, batch_size: 24, micro_batch: 8}}
train_diffusion: {{model: unet-tiny, steps: 4, batch_size: 24, micro_batch: 8, log_every: 2, checkpoint_every: 2,
                  grid_steps: 2, adversarial: {{mode: adversarial, fraction: 0.5}}}}
generate: {{per_class: 8, batch_size: 16, network_batch: 8, steps: 4}}
mix: {{synthetic_fraction: 0.5}}
train: {{epochs: 2, batch_size: 24, micro_batch: 8, val_limit: 12, attack: {{steps: 2}}, val_attack_steps: 3}}
evaluate: {{n: 12, version: custom, attacks: [apgd-ce], sweep_steps: 2,
           threats: {{linf: {{norm: Linf, eps: 8/255, sweep: [0, 8/255], large_eps: 0.5}}}}}}
"""


def image_folder(root: Path, per_class: int, classes: int = 3, size: int = 32) -> Path:
    """train/<class>/*.png and test/<class>/*.png: images whose colour says their class, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                image = np.zeros((size, size, 3), np.int64)
                image[..., label % 3] = 200
                pixels = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def run_command(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, stderr) of `command`; past `timeout` seconds its whole process group is killed (torchrun's
    workers too), exit code -9."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
        return process.returncode, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        _, stderr = process.communicate()
        return -9, f"timed out after {timeout:g} s\n{stderr}"


def stages(device: str) -> dict:
    """The real stages on tiny data, each multi-process one under torchrun: one process in a real process group
    (`torchrun --nproc_per_node=1`), or with two GPUs `base.nproc` 2 and plain `dmat <stage>`, as `dvc repro` runs."""
    gpus = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    nproc, timeout = 2 if gpus >= 2 else 1, 300 if gpus else 1200  # a stage's seconds: tiny data, a shared CPU
    found = {"processes": nproc}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = image_folder(work / "folder", per_class=24)
        (work / "params.yaml").write_text(STAGE_PARAMS.format(device=device.split(":")[0], nproc=nproc,
                                                              folder=folder))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                         os.environ.get("PYTHONPATH")]))}
        env.pop("MLFLOW_TRACKING_URI", None)
        dmat = [sys.executable, "-m", "dmat.cli"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                    "dmat.cli"]
        for stage in ("prepare", "train-reference", "train-diffusion", "generate", "mix", "train", "evaluate"):
            under_torchrun = stage not in ("prepare", "mix") and nproc == 1
            started = time.perf_counter()
            code, stderr = run_command((torchrun if under_torchrun else dmat) + [stage], work, env, timeout)
            found[stage] = {"exit": code, "seconds": round(time.perf_counter() - started, 1)}
            if code:
                found[stage]["stderr"] = stderr[-2000:]
                break
        found["passed"] = "evaluate" in found and all(v["exit"] == 0 for v in found.values() if isinstance(v, dict))
    return found


# --- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the parts that need no GPU, on the CPU")
    parser.add_argument("--skip", nargs="*", default=[], metavar="CHECK", help="checks not to run")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    small = dry  # the CPU runs the same steps on small networks
    report: dict = {"dry_run": dry, "checks": {}, "skipped": {}}
    checks = report["checks"]
    started = time.perf_counter()
    checks["environment"] = checked(environment)(device)
    with one_process_group(device) as w:
        if "collectives" not in args.skip:
            checks["collectives"] = checked(collectives)(w)
        if "ddp_steps" not in args.skip:
            checks["ddp_steps"] = checked(ddp_steps)(w, small)
    later = [("cpu_vs_gpu", lambda: cpu_vs_gpu(device), True),
             ("determinism", lambda: determinism(device, small), False),
             ("throughput", lambda: throughput(device), True),
             ("diffusion_memory", lambda: diffusion_memory(device), True),
             ("stages", lambda: stages(device), False)]
    for name, run, needs_cuda in later:
        if name in args.skip:
            report["skipped"][name] = "--skip"
        elif dry and needs_cuda:
            report["skipped"][name] = "needs CUDA"
        else:
            checks[name] = checked(run)()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["passed"] = all(check["passed"] for check in checks.values())
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
