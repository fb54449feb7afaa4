"""`make bench`: encstate's fan-out, request latency and ledger scale, each beside a baseline
measured in the same run (these machines are shared and noisy). `--scale` runs the community
scale scenarios instead (many rooms, a join storm, one huge room: `bench/scale.py`);
`--synapse-db postgres` backs the throwaway Synapse with PostgreSQL (SQLite by default, so
figures stay comparable).

Prints a table and `RESULT name=value` lines that can be compared across commits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time

from aiohttp import ClientSession, TCPConnector

from harness.synapse import Synapse

from . import fanout, latency, ledger, scale, seal
from .report import Report
from .synapse_db import synapse_database

SHM = "/dev/shm"
HAVE_SHM = os.path.isdir(SHM)
PARTS = ["fanout", "latency", "seal", "ledger"]
SCALE_PARTS = ["rooms", "huge"]


async def run(args: argparse.Namespace, report: Report) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="encstate-bench-") as workdir,
        synapse_database(args.synapse_db) as database,
    ):
        started = time.monotonic()
        # the scale fixtures are tens of thousands of events: the homeserver's files live in
        # memory there, so building them is not bound by this machine's disk
        parent = SHM if args.scale and HAVE_SHM else None
        extra = {"database": database} if database else None
        with Synapse(extra_config=extra, parent=parent) as synapse:
            report.note(f"Synapse on {synapse.url} ({args.synapse_db}); workdir {workdir}")
            async with ClientSession(connector=TCPConnector(limit=200)) as http:
                if args.scale:
                    await scale.run(synapse, http, workdir, report, args.quick, args.only)
                    report.note(f"total bench time {time.monotonic() - started:.0f} s")
                    return
                if "fanout" in args.only:
                    await fanout.run(synapse, http, workdir, report, args.quick)
                if "latency" in args.only:
                    await latency.run(synapse, http, workdir, report, args.quick)
                if "seal" in args.only:
                    await seal.run(synapse, http, workdir, report, args.quick)
                if "ledger" in args.only:
                    await ledger.run(synapse, http, workdir, report, args.quick)
        report.note(f"total bench time {time.monotonic() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", nargs="+", choices=PARTS + SCALE_PARTS)
    parser.add_argument("--quick", action="store_true", help="smaller N, for a smoke run")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the community scale scenarios (many rooms and a join storm, one huge room)",
    )
    parser.add_argument("--synapse-db", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    if args.only is None:
        args.only = SCALE_PARTS if args.scale else PARTS
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    for noisy in ("mau", "bench", "maubot"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    report = Report()
    try:
        asyncio.run(run(args, report))
    finally:
        report.print()
    sys.exit(0)


if __name__ == "__main__":
    main()
