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

# NVRTC and the CUDA headers, so every kernel is compile-checked for sm_80/sm_90 with no GPU
# (13.0.88 is the NVRTC build of the GPU machine's environment). Kept apart from .venv:
# torch pins its own CUDA wheels.
nv=.nvrtc
nv_pins="nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88"
if [ "$(cat "$nv/.pins" 2>/dev/null)" != "$nv_pins" ]; then
  echo "== installing NVRTC into $nv"
  rm -rf "$nv"
  python3 -m pip install --quiet --disable-pip-version-check --target "$nv" $nv_pins
  echo "$nv_pins" > "$nv/.pins"
fi
export LD_LIBRARY_PATH="$PWD/$nv/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SGPT_CUDA_INCLUDE="$PWD/$nv/nvidia/cu13/include"
export SGPT_REQUIRE_NVRTC=1

echo "== cargo test"
cargo test --all-targets

# ---- python/: the sgpt Python package (PyO3 + maturin; python/README.md) ------------------
# Installed into .venv when its sources or the library's change (a stamp keyed by their hash),
# before the Python tests below, which include tests/python/test_package.py. pip fetches maturin
# from PyPI into an isolated build env and builds in python/target (release profile; a cold
# build took 6 minutes on 2 cores, a change to src/ about 1 minute).
pkg_stamp=$venv/.sgpt-package
pkg_hash=$(find python src kernels Cargo.toml \( -path python/target -o -name __pycache__ \) -prune \
  -o -type f ! -name '*.so' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$pkg_stamp" 2>/dev/null)" != "$pkg_hash" ]; then
  echo "== installing the sgpt Python package (python/) into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check ./python
  echo "$pkg_hash" > "$pkg_stamp"
fi
# Fail (not skip) test_package.py if the package is not importable.
export SGPT_REQUIRE_PACKAGE=1
# ---- end of the python/ section ---------------------------------------------------------------

echo "== python tests (tools/)"
# tests/python/test_server.py runs the binary that cargo test just built.
export SGPT_BIN="${SGPT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/sgpt}"
"$venv/bin/python" -m pytest tests/python -q
