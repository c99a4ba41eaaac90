"""The exporter's progress bar: drawn on a terminal only, and its total is the work the gate really does."""
from __future__ import annotations

import io

import pytest

import export.progress as progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_and_clears_its_line():
    out = FakeTTY()
    bar = progress.Bar("verify", 4, stream=out)
    for _ in range(4):
        bar.advance(1, "step")
    drawn = out.getvalue()
    assert "|" + "#" * progress.WIDTH + "|" in drawn and "4/4" in drawn
    bar.close()
    assert out.getvalue().endswith("\r")


def test_bar_is_silent_in_logs():
    out = io.StringIO()  # not a terminal: CI logs get the stage lines, not carriage returns
    bar = progress.Bar("verify", 3, stream=out)
    bar.advance(3)
    bar.close()
    assert out.getvalue() == ""


@pytest.mark.slow
def test_gate_total_matches_the_steps_taken(tiny_ckpt, tmp_path, monkeypatch):
    seen = {}

    class Counting(progress.Bar):
        def __init__(self, label, total, stream=None, enabled=None):
            super().__init__(label, total, stream=io.StringIO(), enabled=False)
            self.steps = 0
            seen["bar"] = self

        def advance(self, n=1, what=""):
            self.steps += n
            super().advance(n, what)

    monkeypatch.setattr(progress, "Bar", Counting)
    from export.build import build

    build(tiny_ckpt, tmp_path / "a", lift_mode="arith", log=lambda m: None, progress=True)
    bar = seen["bar"]
    assert bar.steps == bar.total, (bar.steps, bar.total)
