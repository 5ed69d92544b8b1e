"""Load generator for bench_serve, run as its own process so that it takes no GIL time from a server under test.

    python -m benchmarks.serve_load HOST PORT REQUESTS_FILE --clients 8 --warmup 1 --duration 5

REQUESTS_FILE holds complete HTTP/1.1 requests (head and body), each prefixed by its length as an
8-byte little-endian integer; client k sends them in turn starting at the k-th. Every client keeps
its connection alive and opens a new one only when the server closes it (HTTP/1.0 or
`Connection: close`), or after an error. Requests that start after the warm-up and end before the
deadline are counted. Prints one JSON object: requests, by status, connection errors, seconds,
latencies in ms (p50, p95, p99), and every answer received, warm-up included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections import Counter
from pathlib import Path


def read_requests(path: Path) -> list[bytes]:
    data, requests, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        requests.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    return requests


def write_requests(path: Path, requests: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<Q", len(request)) + request for request in requests))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes the connection after it), with the body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
    if headers.get(b"transfer-encoding", b"").strip() == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    closes = lines[0].startswith(b"http/1.0") or headers.get(b"connection", b"").strip() == b"close"
    return status, closes


async def client(host: str, port: int, requests: list[bytes], first: int, measure_from: float, until: float,
                 outcome: dict) -> None:
    reader = writer = None
    index = first
    while time.perf_counter() < until:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                outcome["connection_errors"] += 1
                await asyncio.sleep(0.01)
                continue
        request = requests[index % len(requests)]
        index += 1
        started = time.perf_counter()
        try:
            writer.write(request)
            status, closes = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            outcome["connection_errors"] += 1
            writer.close()
            writer = None
            continue
        ended = time.perf_counter()
        outcome["answered"] += 1
        if started >= measure_from and ended <= until:
            outcome["statuses"][status] += 1
            outcome["latencies"].append(ended - started)
        if closes:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def generate_load(host: str, port: int, requests: list[bytes], clients: int, warmup_s: float,
                        duration_s: float) -> dict:
    outcome = {"statuses": Counter(), "latencies": [], "connection_errors": 0, "answered": 0}
    measure_from = time.perf_counter() + warmup_s
    until = measure_from + duration_s
    await asyncio.gather(*(client(host, port, requests, k, measure_from, until, outcome) for k in range(clients)))
    latencies = sorted(outcome["latencies"])

    def percentile(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2) if latencies else None

    return {"requests": len(latencies), "seconds": duration_s, "statuses": dict(outcome["statuses"]),
            "connection_errors": outcome["connection_errors"], "answered_incl_warmup": outcome["answered"],
            "p50_ms": percentile(0.50), "p95_ms": percentile(0.95), "p99_ms": percentile(0.99)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("requests", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    load = generate_load(args.host, args.port, read_requests(args.requests), args.clients, args.warmup, args.duration)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(load)
    else:
        result = uvloop.run(load)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
