"""`sgpt embed` as the Python tests run it, to compare the package and Ray against the CLI.

The binary is env SGPT_BIN (default target/debug/sgpt, which `cargo test` builds).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SGPT_BIN", ROOT / "target" / "debug" / "sgpt"))
MODEL = ROOT / "models" / "sgpt-tiny"


def embed_jsonl(lines: list[dict], out_dir: Path, *flags: str, timeout: float) -> np.ndarray:
    """`sgpt embed --input` on `lines` written verbatim as JSONL, on the CPU: its .npy. Each call
    gets its own files in `out_dir`."""
    if not BIN.exists():
        pytest.fail(f"{BIN} not found: run `cargo build` first (tools/test.sh does)")
    n = len(list(out_dir.iterdir()))
    src, out = out_dir / f"cli-{n}.jsonl", out_dir / f"cli-{n}.npy"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    subprocess.run(
        [str(BIN), "embed", "--model", str(MODEL), "--quiet", "--device", "cpu",
         "--input", str(src), "-o", str(out), *flags],
        check=True, capture_output=True, text=True, timeout=timeout,
    )
    return np.load(out)
