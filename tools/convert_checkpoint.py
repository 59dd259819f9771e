#!/usr/bin/env python3
"""Convert a published SGPT-BLOOM checkpoint (PyTorch .bin) into safetensors for the sgpt engine.

The SGPT-BLOOM checkpoints on the Hugging Face hub are PyTorch pickles: either one
`pytorch_model.bin`, or shards `pytorch_model-0000i-of-0000n.bin` listed in
`pytorch_model.bin.index.json`. The engine memory-maps safetensors, so convert once:

    # 1. download (28.3 GB of fp32 shards for the 7b1 flagship)
    huggingface-cli download bigscience/sgpt-bloom-7b1-msmarco --local-dir ~/models/sgpt-bloom-7b1-msmarco

    # 2. convert, here to float16 (14.1 GB), sharded at 5 GB, and check every tensor afterwards
    python3 tools/convert_checkpoint.py ~/models/sgpt-bloom-7b1-msmarco ~/models/sgpt-bloom-7b1-msmarco-f16 \\
        --dtype float16 --verify

Output: `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
(`{"metadata": {"total_size": ...}, "weight_map": {name: file}}`), plus the side files the engine
reads (config.json, tokenizer.json, sentence_bert_config.json, 1_Pooling/, ...). Tensor names are
kept exactly (with or without the `transformer.` prefix); `lm_head.weight` is dropped because an
embedding model never uses it (for BLOOM it is tied to the embeddings anyway). config.json is
copied unchanged: the engine takes the dtype from the safetensors headers, not from the config.

Memory: one input shard is loaded at a time, memory-mapped (torch.load(mmap=True)); output
shards are flushed as soon as they reach --max-shard-size, so peak RAM stays around one input shard
plus one output shard (less when no cast is needed, as mmapped tensors are written straight through).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIDE_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "modules.json",
    "config_sentence_transformers.json",
]
SIDE_DIRS = ["1_Pooling"]
DROPPED = {"lm_head.weight"}
BIN_INDEX = "pytorch_model.bin.index.json"
SHARD_RE = re.compile(r"pytorch_model-\d+-of-\d+\.bin$")


class ConvertError(Exception):
    """A user-facing problem with the input or output; reported without a traceback."""


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2^20, '1024' -> 1024 (decimal units, like transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (expected e.g. 5GB, 500MB, 2GiB, 1000000)")
    unit = m.group(2).rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise argparse.ArgumentTypeError("max shard size must be positive")
    return size


def find_input_shards(src: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The .bin files to read, in order, and the index's weight_map (None for a single file)."""
    if not src.exists():
        raise ConvertError(f"input directory {src} does not exist")
    if not src.is_dir():
        raise ConvertError(f"input {src} is not a directory")
    index_path = src / BIN_INDEX
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"bad index {index_path}: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"bad index {index_path}: no 'weight_map' object with entries")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ConvertError(f"bad index {index_path}: weight_map must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ConvertError(f"bad index {index_path}: shard file(s) not found: {', '.join(missing)}")
        return [src / f for f in files], weight_map
    single = src / "pytorch_model.bin"
    if single.is_file():
        return [single], None
    shards = sorted(p for p in src.iterdir() if SHARD_RE.match(p.name))
    if shards:
        raise ConvertError(f"found {len(shards)} pytorch_model-*.bin shards in {src} but no {BIN_INDEX}")
    hint = " (it already has safetensors weights)" if any(src.glob("*.safetensors")) else ""
    raise ConvertError(f"no pytorch_model.bin or {BIN_INDEX} found in {src}{hint}")


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # mmap needs the zip format (torch >= 1.6); legacy pickles have to be read into memory.
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated or foreign files, ...
        raise ConvertError(f"cannot load {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError(f"{path} does not hold a state dict of tensors")
    return sd


def iter_input(shards: list[Path], weight_map: dict[str, str] | None):
    """Yield (name, tensor) over all input shards, one shard in memory at a time."""
    seen: set[str] = set()
    for path in shards:
        sd = load_bin(path)
        if weight_map is not None:
            expected = {k for k, f in weight_map.items() if f == path.name}
            absent = sorted(expected - sd.keys())
            if absent:
                raise ConvertError(f"bad index: {len(absent)} tensor(s) listed for {path.name} are not in it, "
                                   f"e.g. {absent[0]}")
        for name, t in sd.items():
            if name in seen:
                raise ConvertError(f"tensor {name} appears in more than one shard")
            seen.add(name)
            yield name, t
        del sd


def prepare(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    # safetensors rejects non-contiguous tensors and views sharing storage (e.g. tied weights).
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_output_dir(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"output {dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()):
        if not force:
            raise ConvertError(f"output directory {dst} exists and is not empty (use --force to overwrite)")
        # Stale shards from an earlier run would be mixed up with the new ones.
        for p in list(dst.glob("model*.safetensors")) + [dst / "model.safetensors.index.json"]:
            if p.exists():
                p.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def convert(src: Path, dst: Path, dtype: torch.dtype | None, max_shard_size: int, force: bool) -> dict[str, str]:
    shards, weight_map = find_input_shards(src)
    check_output_dir(dst, force)

    tmp_names: list[str] = []
    file_of: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(tmp_names) + 1:05d}.tmp.safetensors"
            save_file(pending, str(dst / name), metadata={"format": "pt"})
            tmp_names.append(name)
            file_of.update({k: name for k in pending})
        pending, pending_bytes = {}, 0

    for name, t in iter_input(shards, weight_map):
        if name in DROPPED:
            continue
        t = prepare(t, dtype)
        if pending and pending_bytes + nbytes(t) > max_shard_size:
            flush()
        pending[name] = t
        pending_bytes += nbytes(t)
        total += nbytes(t)
    flush()
    if not file_of:
        raise ConvertError(f"no tensors found in {src}")

    # Final names need the shard count, known only now.
    n = len(tmp_names)
    final = {tmp: "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
             for i, tmp in enumerate(tmp_names, 1)}
    for tmp, fin in final.items():
        (dst / tmp).replace(dst / fin)
    file_of = {k: final[v] for k, v in file_of.items()}
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": file_of}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    for f in SIDE_FILES:
        if (src / f).is_file() and not _same(src / f, dst / f):
            shutil.copy2(src / f, dst / f)
    for d in SIDE_DIRS:
        if (src / d).is_dir() and not _same(src / d, dst / d):
            shutil.copytree(src / d, dst / d, dirs_exist_ok=True)
    return file_of


def _same(a: Path, b: Path) -> bool:
    return b.exists() and a.resolve() == b.resolve()


def verify(src: Path, dst: Path, dtype: torch.dtype | None, file_of: dict[str, str]) -> int:
    """Compare every output tensor with the input (after the same cast); returns the count checked."""
    shards, weight_map = find_input_shards(src)
    handles = {f: safe_open(str(dst / f), framework="pt") for f in sorted(set(file_of.values()))}
    stored = {k for h in handles.values() for k in h.keys()}
    if stored != set(file_of):
        raise ConvertError(f"verify: output holds {len(stored)} tensors, expected {len(file_of)}")
    checked = 0
    for name, t in iter_input(shards, weight_map):
        if name in DROPPED:
            continue
        if name not in file_of:
            raise ConvertError(f"verify: {name} missing from the output")
        want = prepare(t, dtype)
        got = handles[file_of[name]].get_tensor(name)
        # Bitwise comparison: also exact for NaN payloads and -0.0.
        same = (got.dtype == want.dtype and got.shape == want.shape
                and torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)))
        if not same:
            raise ConvertError(f"verify: {name} differs (got {got.dtype} {tuple(got.shape)}, "
                               f"want {want.dtype} {tuple(want.shape)})")
        checked += 1
    if checked != len(file_of):
        raise ConvertError(f"verify: checked {checked} tensors, output has {len(file_of)}")
    return checked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Convert an SGPT-BLOOM PyTorch .bin checkpoint to safetensors.",
        epilog="Example: convert_checkpoint.py sgpt-bloom-7b1-msmarco out-f16 --dtype float16 --verify",
    )
    ap.add_argument("input", type=Path, help="checkpoint directory with pytorch_model*.bin")
    ap.add_argument("output", type=Path, help="directory to write the safetensors checkpoint to")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="cast floating-point tensors (default: keep the stored dtype)")
    ap.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                    help="largest output file before splitting into shards (default 5GB = 5e9 bytes)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    ap.add_argument("--verify", action="store_true", help="reload the output and compare every tensor")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        file_of = convert(args.input, args.output, dtype, args.max_shard_size, args.force)
        files = sorted(set(file_of.values()))
        print(f"wrote {len(file_of)} tensors to {args.output} in {len(files)} file(s): {', '.join(files)}")
        if args.verify:
            n = verify(args.input, args.output, dtype, file_of)
            print(f"verified {n} tensors: identical to the input{' after the cast' if dtype else ''}")
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
