"""How the exporter shows progress: `Stages` (timed stage lines, a heartbeat) and `Bar`, a one-line
progress bar for the long stages, drawn only on a terminal.

Why its own 40 lines and not tqdm: the runtime's users never see it, the exporter needs exactly
one bar at a time, and in logs (CI, pipes) a bar is noise: there the stage heartbeat lines speak.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

WIDTH = 28


def rss_bytes() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process from /proc/self/status (VmRSS, VmHWM);
    (0, 0) where there is no /proc. Why: the gate records both at each of its phases, so a build's
    peak memory can be traced to the phase that set it (benchmarks/export_bench.py prints them)."""
    try:
        with open("/proc/self/status") as f:
            vals = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(vals["VmRSS"].split()[0]) * 1024, int(vals["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


class Bar:
    """`bar.advance(n, what)` moves the bar; `bar.close()` clears the line. Silent when not on a TTY."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = self._last = time.perf_counter()

    def advance(self, n: int = 1, what: str = "") -> None:
        self.done = min(self.done + n, self.total)
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.done < self.total):
            return
        self._last = now
        filled = WIDTH * self.done // self.total
        line = (f"\r[export] {self.label:<10} |{'#' * filled}{'.' * (WIDTH - filled)}| "
                f"{self.done}/{self.total} {now - self.t0:5.1f} s {what}")
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()


class NoBar(Bar):
    """What library callers get by default: the same interface, never drawn."""

    def __init__(self) -> None:
        super().__init__("", 1, enabled=False)


class Stages:
    """Prints `stage ... s` lines and keeps the timings for the manifest; a heartbeat for long stages."""

    def __init__(self, log: Callable[[str], None], heartbeat_s: float = 15.0):
        self.log, self.heartbeat_s, self.seconds = log, heartbeat_s, {}

    @contextmanager
    def __call__(self, name: str, heartbeat: bool = True) -> Iterator[None]:
        """`heartbeat=False` where a progress bar already shows the stage moving."""
        t0 = time.perf_counter()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                self.log(f"  ... {name} still running ({time.perf_counter() - t0:.0f} s)")

        if heartbeat:
            threading.Thread(target=beat, daemon=True).start()
        try:
            yield
        finally:
            done.set()
            self.seconds[name] = time.perf_counter() - t0
        self.log(f"[export] {name:<10} {self.seconds[name]:7.2f} s")
