#!/usr/bin/env bash
# Builds everything the device script needs into .device/ (git-ignored), here, so nothing but
# the kernels is compiled on the GPU machine: the release `sgpt` binary and the GPU-side test
# binaries, stripped, plus the commit they were built from. Then, with the device tool:
#   run(command="SGPT_DEVICE_BUDGET=540 bash tools/device_check.sh", carry=[".device"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device && mkdir -p .device/tests
cargo build --release --bin sgpt
cp target/release/sgpt .device/sgpt
# Test binaries of the suites that matter on a GPU (release profile: fast and what we ship).
cargo test --release --no-run --message-format=json --test gpu --test nvrtc --test golden 2>/dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], ".device/tests/" + m["target"]["name"])
'
strip .device/sgpt .device/tests/* 2>/dev/null || true
dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo "-dirty" || true)
echo "$(git rev-parse --short HEAD)$dirty" > .device/COMMIT
du -sh .device; ls -la .device .device/tests
