"""`dmat precision show | clear`: the precision decisions this machine keeps for `base.precision: auto`.

`show` lists each decision (its key, the stage, network and batch it was probed for, the setting chosen,
the probe's median milliseconds per pass, when and on which host); `clear [KEY ...]` removes the named
decisions (key prefixes) or all of them, so that the next run of those workloads probes again. Exit 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

EXIT_OK = 0


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="list the kept decisions", description="List this machine's kept "
                              "precision decisions (where: $DMAT_CACHE_DIR/precision, default ~/.cache/dmat).")
    show.add_argument("--json", action="store_true", help="print the records as JSON")
    clear = actions.add_parser("clear", help="remove kept decisions (the next runs probe again)",
                               description="Remove the kept decisions named by key prefix, or all of them.")
    clear.add_argument("keys", nargs="*", metavar="KEY", help="key prefixes (default: all)")


def run(args: argparse.Namespace) -> int:
    from dmat.precision_decisions import all_decisions, cache_dir, forget

    if args.action == "clear":
        removed = forget(args.keys)
        print(f"dmat precision: removed {len(removed)} decision(s) from {cache_dir()}", file=sys.stderr)
        return EXIT_OK
    records = all_decisions()
    if args.json:
        print(json.dumps(records, indent=2))
        return EXIT_OK
    print(f"{len(records)} decision(s) in {cache_dir()}")
    for record in records:
        print(_line(record))
    return EXIT_OK


def _line(record: dict) -> str:
    decision, workload, machine = record["decision"], record["workload"], record["machine"]
    probe = ", ".join(f"{name} {1000 * statistics.median(times):.1f} ms"
                      for name, times in decision.get("probe_s", {}).items())
    where = machine.get("gpu") or machine.get("cpu", "?")
    return (f"{record['key']}  {workload.get('stage', '?')} {workload.get('network', '?')} batch "
            f"{workload.get('batch', '?')} x{workload.get('world_size', 1)} -> {decision['precision']} "
            f"{decision['memory_format']}  ({probe})  {where}, {record.get('host', '?')}, "
            f"{record.get('decided_at', '?')}")
