"""`make bench`: encstate's fan-out, request latency and ledger scale, each beside a baseline
measured in the same run (these machines are shared and noisy).

Prints a table and `RESULT name=value` lines that can be compared across commits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time

from aiohttp import ClientSession, TCPConnector

from harness.synapse import Synapse

from . import fanout, latency, ledger, seal
from .report import Report


async def run(args: argparse.Namespace, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="encstate-bench-") as workdir:
        started = time.monotonic()
        with Synapse() as synapse:
            report.note(f"Synapse on {synapse.url}; workdir {workdir}")
            async with ClientSession(connector=TCPConnector(limit=200)) as http:
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
    parser.add_argument(
        "--only",
        nargs="+",
        default=["fanout", "latency", "seal", "ledger"],
        choices=["fanout", "latency", "seal", "ledger"],
    )
    parser.add_argument("--quick", action="store_true", help="smaller N, for a smoke run")
    args = parser.parse_args()
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
