"""tools/device_check.sh, dry-run: the speed steps (`SGPT_STEPS=bench,tc`) with a fake
`.device/sgpt`, a fake PyTorch baseline and a fake nvidia-smi, in a scratch copy of the layout
the script expects — so its plumbing (which bench runs with which flags, ids and baseline, and
what the report says) is checked here, where there is no GPU.

Run from the repository root:  python3 -m pytest tests/python/test_device_check.py -q
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Records its arguments, one call a line; writes a bench JSON where --json asks, with numbers
# chosen per dtype so the report's ratios can be checked.
FAKE_SGPT = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
json=""; dtype=f16; prev=""
for a in "$@"; do
  [ "$prev" = "--json" ] && json=$a
  [ "$prev" = "--dtype" ] && dtype=$a
  prev=$a
done
case $dtype in
  fp8) tps=1500; p50=1.3 ;;
  fp8-alternate) tps=1200; p50=1.6 ;;
  *) tps=1000; p50=2.0 ;;
esac
[ -n "$json" ] && printf '{"tokens_per_s": %s, "latency": {"batch_01": {"p50_ms": %s}}}' "$tps" "$p50" > "$json"
echo "throughput         $tps tokens/s ($dtype)"
"""

FAKE_TORCH = r"""import sys
args = sys.argv[1:]
val = lambda flag: args[args.index(flag) + 1]
open(val("--write-ids"), "w").write("[1, 2, 3]\n")
open(val("--json"), "w").write("{}")
print("torch fp16 best batch: fake")
"""


def dry_run(tmp_path: Path, budget: int) -> tuple[subprocess.CompletedProcess, list[str], str, Path]:
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "device_check.sh", root / "tools")
    (root / "tools" / "bench_torch_gpu.py").write_text(FAKE_TORCH)
    (root / ".device").mkdir()
    (root / ".device" / "COMMIT").write_text("0000000\n")
    sgpt = root / ".device" / "sgpt"
    sgpt.write_text(FAKE_SGPT)
    sgpt.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Fake GPU, 0.0, 1 MiB'\n")
    smi.chmod(0o755)
    calls, out, logs = tmp_path / "calls.txt", tmp_path / "out", tmp_path / "logs"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        OUT=str(out),
        SGPT_DEVICE_LOGS=str(logs),
        SGPT_STEPS="bench,tc",
        SGPT_DEVICE_BUDGET=str(budget),
        FAKE_CALLS=str(calls),
    )
    r = subprocess.run(
        ["bash", "tools/device_check.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    report = (out / "report.md").read_text()
    return r, lines, report, logs


def test_fp8_alternate_is_benched_beside_fp8_on_the_f16_ids_and_baseline(tmp_path):
    r, calls, report, logs = dry_run(tmp_path, 420)
    assert r.returncode == 0, r.stdout + r.stderr
    benches = [c for c in calls if c.startswith("bench --shape bloom-7b1")]
    # f16 first (the ids and baseline come from its step), then every trial bench on the same
    # ids and baseline.
    ids_base = f"--ids {logs}/ids.jsonl --baseline {logs}/torch.json"
    assert ids_base in benches[0] and "--dtype" not in benches[0], benches[0]
    by_dtype = {c.split("--dtype ")[1].split()[0]: c for c in benches if "--dtype" in c and "kernels" not in c}
    assert set(by_dtype) == {"fp8", "fp8-alternate"}, benches
    for dtype, c in by_dtype.items():
        assert ids_base in c and f"--json {logs}/bench-7b1-{dtype}.json" in c, c
    # fp8-alternate right after fp8, before the FP8 kernel timings.
    order = [c for c in calls if "--dtype" in c]
    assert [c.split("--dtype ")[1].split()[0] for c in order] == ["fp8", "fp8-alternate", "fp8"], order
    assert "bench kernels" in order[2]
    # The report: both sections, and both compared with the f16 run (the fake's numbers).
    assert "## The same with FP8 GEMMs (--dtype fp8, issue 15) (on trial)" in report
    assert "## The same with FP8 GEMMs in every other block (--dtype fp8-alternate, issue 15)" in report
    assert "fp8 vs f16: 1.50x the throughput (target >= 1.5), 0.65x the one-query p50" in report
    assert "fp8-alternate vs f16: 1.20x the throughput, 0.80x the one-query p50; 0.80x fp8's throughput" in report
    assert "all checks passed" in report


def test_steps_that_no_longer_fit_are_skipped_and_said(tmp_path):
    # Too little budget for any bench: nothing runs, each step says it was skipped, and the run
    # fails (so a short budget is never mistaken for a pass).
    r, calls, report, _ = dry_run(tmp_path, 10)
    assert r.returncode == 1
    assert calls == []
    for what in ["speed table", "bench with FP8 GEMMs (--dtype fp8, issue 15)",
                 "bench with FP8 GEMMs in every other block (--dtype fp8-alternate, issue 15)"]:
        assert f"- {what}: **skipped**" in report, report
    assert "fp8-alternate vs f16" not in report
    assert "SOME CHECKS FAILED" in report
