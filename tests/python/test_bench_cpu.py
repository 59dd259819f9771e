"""tools/bench_cpu.py: a record is never overwritten (a second run on the same day, perhaps on
another machine, gets its own file).

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
