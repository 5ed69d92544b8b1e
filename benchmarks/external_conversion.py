"""Converting a published-layout .npz into a store: images/s and peak memory for 10k, 100k and 1M images.

Writes random sets in the reference's layout (`image` uint8 N×32×32×3, `label` int64, np.savez's stored zip
members; the files are written member by member, never whole in memory) into a scratch directory, then converts
each in a fresh process with `dmat.data.external.ExternalSet` (the two passes, the sha256 of the source file, the
class sort and the sealing of the store, i.e. everything `generate.source: external` does but the MLflow record).
Reported per size: seconds, images/s, the child's peak RSS (its VmHWM) and the bytes it read
(/proc/<pid>/io rchar, as a multiple of the file's size: about 2, once for the conversion with the file's sha256
taken on the way, once more to hash the finished store as every store is sealed). Baselines, in the same run
and on the same files: a bare front-to-back read of the file (the I/O floor), and `np.load` of the same .npz (its
peak RSS grows with N: what the reference's loader and merge-data.py do). Labels are random, not class-sorted, so
every chunk is scattered over every class: the conversion's worst case. The files sit in the page cache after
being written, so the figures are CPU-bound; a cold disk adds its read time. Deletes everything it wrote.

    PYTHONPATH=src .venv/bin/python -m benchmarks.external_conversion --scratch /tmp/dmat-conversion
    # --sizes 10000 100000 1000000 (default); 1M images is 3.1 GB of .npz plus 3.1 GB of store: check `df -h`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from benchmarks.measure import machine

SHAPE = (32, 32, 3)
CLASSES = 10
CHUNK = 50_000


def write_published_npz(path: Path, n: int, seed: int = 0) -> None:
    """np.savez's layout (stored zip64 members image.npy and label.npy), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, dtype, shape in (("image", np.uint8, (n, *SHAPE)), ("label", np.int64, (n,))):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(member, header)
                for start in range(0, n, CHUNK):
                    count = min(CHUNK, n - start)
                    block = rng.integers(0, 256, size=(count, *SHAPE), dtype=np.uint8) if name == "image" else \
                        rng.integers(0, CLASSES, size=count).astype(np.int64)
                    member.write(block.tobytes())


# Each child reports its own peak RSS (VmHWM: the high-water mark of its own address space; wait4's ru_maxrss would
# include the parent's size at fork) and the bytes it read while working (rchar, without the interpreter's start).
REPORT = """
def _report(seconds, rchar_before):
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print(json.dumps({"seconds": seconds, "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
                      "rchar": int(io["rchar"]) - rchar_before}))
def _rchar():
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])
"""
CONVERT = """
import json, sys, time
from pathlib import Path
from dmat.data.external import ExternalSet
""" + REPORT + """
source, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
before, started = _rchar(), time.perf_counter()
ExternalSet([source], [str(c) for c in range(int(sys.argv[3]))], (32, 32, 3)).write(out)
_report(time.perf_counter() - started, before)
"""
READ = """
import json, sys, time
""" + REPORT + """
before, started = _rchar(), time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as f:
    while f.read(1 << 23):
        pass
_report(time.perf_counter() - started, before)
"""
NP_LOAD = """
import json, sys, time
import numpy as np
""" + REPORT + """
before, started = _rchar(), time.perf_counter()
with np.load(sys.argv[1]) as data:
    images, labels = data["image"], data["label"]
_report(time.perf_counter() - started, before)
"""


def child(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; its JSON report (seconds, peak RSS in MiB, bytes read)."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(result.stdout.splitlines()[-1])


def measure(scratch: Path, n: int, with_np_load: bool) -> dict:
    source, out = scratch / f"{n}.npz", scratch / f"store-{n}"
    write_published_npz(source, n)
    size = source.stat().st_size
    try:
        read = child(READ, str(source))
        convert = child(CONVERT, str(source), str(out), str(CLASSES))
        loaded = child(NP_LOAD, str(source)) if with_np_load else None
    finally:
        source.unlink()
        shutil.rmtree(out, ignore_errors=True)
    return {"images": n, "npz_bytes": size,
            "convert": {"seconds": round(convert["seconds"], 2), "images_per_s": round(n / convert["seconds"]),
                        "mb_per_s": round(size / 1e6 / convert["seconds"], 1),
                        "peak_rss_mib": round(convert["peak_rss_mib"], 1),
                        "bytes_read_over_file_size": round(convert["rchar"] / size, 3)},
            "baseline_bare_read": {"seconds": round(read["seconds"], 2),
                                   "mb_per_s": round(size / 1e6 / read["seconds"]),
                                   "peak_rss_mib": round(read["peak_rss_mib"], 1)},
            "baseline_np_load": loaded and {"seconds": round(loaded["seconds"], 2),
                                            "peak_rss_mib": round(loaded["peak_rss_mib"], 1)},
            "convert_seconds_over_bare_read": round(convert["seconds"] / read["seconds"], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.external_conversion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dmat-conversion"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--np-load-up-to", type=int, default=1_000_000,
                        help="largest size also loaded whole with np.load (it needs the whole set in memory)")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=False)
    try:
        print(json.dumps({"machine": machine()}), flush=True)
        for n in args.sizes:
            started = time.perf_counter()
            result = measure(args.scratch, n, n <= args.np_load_up_to)
            print(json.dumps({**result, "wall_seconds_with_setup": round(time.perf_counter() - started, 1)}),
                  flush=True)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
