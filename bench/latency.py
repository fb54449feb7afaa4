"""Request latency: newcomers ask for a room's state sessions while a big push runs."""

from __future__ import annotations


async def run(synapse, http, workdir, report, quick) -> None:
    report.note("latency: not written yet")
