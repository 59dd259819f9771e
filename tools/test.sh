#!/usr/bin/env bash
# The project's test command (README, .ci/run): Rust tests, then the Python tests of the tools.
# Python packages go into .venv (pinned in tools/requirements.txt), set up on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp=$venv/.requirements
if ! cmp -s tools/requirements.txt "$stamp" 2>/dev/null; then
  echo "== setting up $venv from tools/requirements.txt (first run takes a few minutes)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tools/requirements.txt
  cp tools/requirements.txt "$stamp"
fi

echo "== cargo test"
cargo test --all-targets

echo "== python tests (tools/)"
# tests/python/test_server.py runs the binary that cargo test just built.
export SGPT_BIN="${SGPT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/sgpt}"
"$venv/bin/python" -m pytest tests/python -q
