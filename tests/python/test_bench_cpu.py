"""tools/bench_cpu.py: the fastest of --reps passes is kept, and a record is never overwritten (a
second run on the same day, perhaps on another machine, gets its own file).

Run from the repository root:  python3 -m pytest tests/python/test_bench_cpu.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import bench_cpu  # noqa: E402


def test_fresh_stem_never_reuses_a_record(tmp_path: Path) -> None:
    assert bench_cpu.fresh_stem(tmp_path, "cpu-sizes-2026-12-02") == tmp_path / "cpu-sizes-2026-12-02"
    (tmp_path / "cpu-sizes-2026-12-02.md").write_text("first")
    assert bench_cpu.fresh_stem(tmp_path, "cpu-sizes-2026-12-02") == tmp_path / "cpu-sizes-2026-12-02-2"
    # a lone .json counts too: the pair is written together
    (tmp_path / "cpu-sizes-2026-12-02-2.json").write_text("{}")
    assert bench_cpu.fresh_stem(tmp_path, "cpu-sizes-2026-12-02") == tmp_path / "cpu-sizes-2026-12-02-3"


def test_torch_bench_keeps_the_fastest_of_reps_passes_at_the_best_batch_size(monkeypatch) -> None:
    # A stand-in model on a fake clock: B=1 is slow (one pass 64 s), the passes at B=8 take 8,
    # 6 and 7 s: the kept figure must be the fastest, neither the first nor the last.
    seqs = [[1, 2, 3]] * 64
    clock = {"t": 0.0, "b8_batches": 0}

    def fake_embed(model, batch):
        if len(batch) == 1:
            clock["t"] += 1.0
        else:
            done_passes = max(clock["b8_batches"] - 1, 0) // 8  # the first call is the warm-up
            clock["t"] += [8.0, 6.0, 7.0][done_passes] / 8
            clock["b8_batches"] += 1

    monkeypatch.setattr(bench_cpu, "torch_embed", fake_embed)
    monkeypatch.setattr(bench_cpu.time, "perf_counter", lambda: clock["t"])
    # The load could not be read (None): it must stay unknown, not become a measured 0.
    monkeypatch.setattr(bench_cpu, "Contention", lambda: type("C", (), {"other_load": lambda s: None})())

    b1, b8 = bench_cpu.torch_bench(None, seqs, [1, 8], reps=3)
    assert b1["pass_seconds"] == [64.0] and b1["seconds"] == 64.0
    assert b8["pass_seconds"] == [8.0, 6.0, 7.0]
    assert b8["seconds"] == 6.0 and b8["tokens_per_s"] == 64 * 3 / 6.0
    assert b8["other_load"] is None
