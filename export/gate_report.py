"""The parity gate's report: one row per check (what was measured, the bound, pass or fail) and the
gate's timeline of phases. Why a module of its own: the build prints the table, the manifest
records `to_dict()`, and tests read both, without needing ONNX Runtime or the reference."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .progress import rss_bytes

@dataclass
class Check:
    name: str
    value: float | int | str
    bound: str
    passed: bool
    required: bool = True
    detail: str = ""
    seconds: float = 0.0


class Laps:
    """The gate's timeline: `laps(name)` closes a phase (seconds since the previous one, this
    process's resident and peak resident bytes at its end). Why: the gate's cost is the sum of
    its phases; these rows (manifest: parity -> phases) say which phase took the time and which
    one set the build's peak memory."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._t = time.perf_counter()

    def __call__(self, name: str) -> float:
        now = time.perf_counter()
        rss, peak = rss_bytes()
        seconds = round(now - self._t, 3)
        self.rows.append({"name": name, "seconds": seconds, "rss_bytes": rss, "peak_rss_bytes": peak})
        self._t = now
        return seconds


@dataclass
class Report:
    precision: str
    provider: str
    checks: list[Check] = field(default_factory=list)
    laps: Laps = field(default_factory=Laps, repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.required)

    def add(self, *args, **kwargs) -> Check:
        """Record a check; its time is what passed since the previous check or phase was recorded."""
        c = Check(*args, **kwargs)
        c.seconds = self.laps(c.name)
        self.checks.append(c)
        return c

    def to_dict(self) -> dict:
        return {"precision": self.precision, "provider": self.provider, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks], "phases": self.laps.rows}

    def table(self) -> str:
        rows = [("check", "value", "bound", "result")]
        for c in self.checks:
            v = f"{c.value:.3g}" if isinstance(c.value, float) else str(c.value)
            res = "ok" if c.passed else ("FAIL" if c.required else "below (reported only)")
            rows.append((c.name, v, c.bound, res))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(w[i]) for i in range(4)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join(lines) + f"\nparity gate ({self.precision}, {self.provider}): {verdict}"
