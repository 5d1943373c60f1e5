"""bench/bench_sft.py's timing loop: each side trains its whole epoch, rates over every step."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_sft  # noqa: E402


class FakeRunner:
    """A trainer that 'trains' fixed (trained, tokens) per step and records the order it was called in."""

    def __init__(self, name: str, per_step: list[tuple[int, int]], calls: list):
        self.name, self.per_step, self.calls, self.note = name, per_step, calls, name
        self.steps = len(per_step)

    def step(self, i: int) -> tuple[int, int, float]:
        self.calls.append((self.name, i))
        trained, tokens = self.per_step[i]
        return trained, tokens, 2.0 - i / 10


def test_each_side_runs_its_own_epoch_alternating_and_counts_every_step():
    calls: list = []
    ours = FakeRunner("ours", [(5, 10), (3, 10), (7, 10)], calls)
    theirs = FakeRunner("TRL", [(6, 12), (9, 12)], calls)
    out = bench_sft.run_interleaved({"ours": ours, "TRL": theirs})
    # Order alternates each step, and a side whose epoch is over is skipped.
    assert calls == [("ours", 0), ("TRL", 0), ("TRL", 1), ("ours", 1), ("ours", 2)]
    assert out["ours"]["trained"] == 15 and out["TRL"]["trained"] == 15  # the same tokens in all
    assert len(out["ours"]["steps"]) == 3 and len(out["TRL"]["steps"]) == 2
    r = out["ours"]
    assert r["trained_tokens_per_s"] == 15 / r["seconds"] and r["tokens_per_s"] == 30 / r["seconds"]
    assert r["steps"][0]["loss"] == 2.0
