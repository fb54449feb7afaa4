"""Measurements, printed as a table (figure, encstate, baseline) and `RESULT` lines."""

from __future__ import annotations

import os
import resource
import time


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return 0.0


class Timer:
    def __enter__(self) -> Timer:
        self.wall0 = time.monotonic()
        self.cpu0 = cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.wall0
        self.cpu = cpu_seconds() - self.cpu0


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.results: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"# {text}", flush=True)

    def row(self, figure: str, encstate: str, baseline: str, target: str = "") -> None:
        self.rows.append((figure, encstate, baseline, target))
        print(f"  {figure}: {encstate} (baseline {baseline}) {target}", flush=True)

    def result(self, name: str, value: float) -> None:
        self.results.append((name, f"{value:.3f}" if isinstance(value, float) else str(value)))

    def print(self) -> None:
        headers = ("figure", "encstate", "baseline, same run", "target")
        widths = [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(headers)]
        print()
        for row in [headers, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
        print()
        for name, value in self.results:
            print(f"RESULT {name}={value}")
