"""tools/load_bench.py: the arithmetic of --engine-baseline, and one short run end to end on the
tiny model (the server, one blocking client, GET /health, then `sgpt bench`).

The binary is env SGPT_BIN (default target/debug/sgpt, which `cargo test` builds).

Run from the repository root:  python3 -m pytest tests/python/test_load_bench.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SGPT_BIN", ROOT / "target" / "debug" / "sgpt"))
sys.path.insert(0, str(ROOT / "tools"))
import load_bench as lb  # noqa: E402


def scrape_of(counts: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    out = {}
    for st, n in counts.items():
        out[f'sgpt_request_stage_seconds_count{{stage="{st}"}}'] = n
    for st, s in sums.items():
        out[f'sgpt_request_stage_seconds_sum{{stage="{st}"}}'] = s
    return out


def test_stage_means_are_per_request_between_scrapes():
    before = scrape_of({"read": 10, "engine": 10}, {"read": 0.001, "engine": 0.5})
    after = scrape_of({"read": 14, "engine": 14}, {"read": 0.003, "engine": 0.5 + 4 * 0.0006})
    m = lb.stage_means_ms(before, after)
    assert m["read"] == pytest.approx(0.5)
    assert m["engine"] == pytest.approx(0.6)
    # A stage with no new observation has no mean (not 0).
    assert m["queue"] is None and set(m) == set(lb.STAGES)


def test_the_target_is_engine_p50_plus_0_3_ms():
    c = lb.compare({"server_p50_ms": 0.9}, {"engine_p50_ms": 0.6})
    assert c["difference_ms"] == pytest.approx(0.3) and c["met"]
    assert c["target_ms"] == pytest.approx(0.9)
    c = lb.compare({"server_p50_ms": 0.91}, {"engine_p50_ms": 0.6})
    assert not c["met"]


@pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} not built")
def test_engine_baseline_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "load_bench.py"), "--model",
           str(ROOT / "models" / "sgpt-tiny"), "--sgpt", str(BIN), "--threads", "2",
           "--concurrency", "1", "--duration", "1", "--max-requests", "200",
           "--engine-baseline", "--record", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    [record] = list(tmp_path.glob("serve-cpu-sgpt-tiny-*.json"))
    o = json.loads(record.read_text())["overhead"]
    s, e = o["server"], o["engine"]
    assert 0 < s["requests_ok"] <= 200
    assert s["server_p50_ms"] > 0 and s["health_p50_ms"] > 0
    # The engine was timed on queries as long as the server's, brackets included.
    assert e["tokens"] == round(s["tokens_per_query"]) and e["tokens"] > 2
    assert e["engine_p50_ms"] > 0 and e["reps"] == 200
    stages = s["stage_means_ms"]
    assert all(stages[st] is not None and stages[st] > 0 for st in lb.STAGES), stages
    # The stages are parts of the server's own request time.
    assert sum(stages.values()) <= s["request_duration_mean_ms"]
    assert o["comparison"]["difference_ms"] == pytest.approx(
        s["server_p50_ms"] - e["engine_p50_ms"])
    md = record.with_suffix(".md").read_text()
    assert "What the server adds to the engine" in md
    assert f"engine p50, `sgpt bench`, one query of {e['tokens']} tokens" in md
    assert "| " + " | ".join(lb.STAGES) + " |" in md
