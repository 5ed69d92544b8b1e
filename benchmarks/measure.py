"""Helpers of the benchmarks: what a figure was measured on, and a speed table from interleaved timings."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from dmat.core.precision import probe

# avx512_bf16: native bf16 dot products (e.g. AMD Zen 4, Intel Cooper Lake); amx_bf16: Intel AMX tiles
# (Sapphire Rapids and later), the big bf16 speed-up; avx512_fp16: native fp16 arithmetic.
PRECISION_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def machine() -> dict:
    info = {"cpu_model": platform.processor() or platform.machine(), "cpu_flags": {}, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: what `lscpu` reports as "Model name" and "Flags"
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("model name", info["cpu_model"])
        flags = set(fields.get("flags", "").split())
        info["cpu_flags"] = {flag: flag in flags for flag in PRECISION_FLAGS}
    return info


def interleaved_seconds(runs: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each run per round: warm-ups first, then rounds interleaved (the `auto` probe's own timer),
    so that load from elsewhere on a shared machine hits every contender alike."""
    return probe(lambda label: runs[label], list(runs), warmup=warmup, repeats=rounds)


def speed_table(seconds: dict[str, list[float]], items: int, baseline: str) -> dict[str, dict]:
    """Items/s per contender (median over rounds, and the slowest and fastest round), and `speedup`, the
    ratio of medians to `baseline`'s, which was measured in the same rounds."""
    base = statistics.median(seconds[baseline])
    return {label: {"per_s": round(items / statistics.median(times), 3),
                    "per_s_range": [round(items / max(times), 3), round(items / min(times), 3)],
                    "rounds": len(times), "speedup": round(base / statistics.median(times), 3)}
            for label, times in seconds.items()}
