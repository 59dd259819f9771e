"""Tests for tools/convert_checkpoint.py, plus a cheap reproducibility check of the golden token ids.

Run from the repository root:  python3 -m pytest tests/python -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import BloomConfig, BloomForCausalLM, BloomModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"

_spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

SIDE = {
    "config.json": '{"model_type": "bloom", "vocab_size": 50, "n_embed": 32, "n_layer": 2, "n_head": 4}\n',
    "tokenizer.json": '{"version": "1.0"}\n',
    "tokenizer_config.json": '{"padding_side": "left"}\n',
    "special_tokens_map.json": '{"pad_token": "<pad>"}\n',
    "sentence_bert_config.json": '{"max_seq_length": 300, "do_lower_case": false}\n',
    "modules.json": "[]\n",
    "config_sentence_transformers.json": "{}\n",
    "1_Pooling/config.json": '{"word_embedding_dimension": 32, "pooling_mode_weightedmean_tokens": true}\n',
}


def tiny_state_dict(causal_lm: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=4)
    model = BloomForCausalLM(cfg) if causal_lm else BloomModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            # Values that are not exactly representable in f16/bf16, so casts are really tested.
            p.copy_(torch.randn(p.shape) * 0.37 + 0.01)
    return model.state_dict()


def write_side_files(d: Path) -> None:
    for name, text in SIDE.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)


@pytest.fixture
def single_ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A BloomModel (no prefix) saved as one pytorch_model.bin, like an old sentence-transformers save."""
    d = tmp_path / "single"
    d.mkdir()
    sd = tiny_state_dict(causal_lm=False)
    torch.save(sd, d / "pytorch_model.bin")
    write_side_files(d)
    return d, sd


@pytest.fixture
def sharded_ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A BloomForCausalLM (transformer. prefix, tied lm_head) in 3 .bin shards + index, as on the hub."""
    d = tmp_path / "sharded"
    d.mkdir()
    sd = tiny_state_dict(causal_lm=True)
    # A non-contiguous tensor: torch.save keeps strides, the converter must make it contiguous.
    key = "transformer.h.1.mlp.dense_4h_to_h.weight"
    sd[key] = sd[key].t().contiguous().t()
    assert not sd[key].is_contiguous()
    names = list(sd)
    groups = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: sd[k] for k in group}, d / fname)
        weight_map.update({k: fname for k in group})
    (d / cc.BIN_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    write_side_files(d)
    return d, sd


def read_output(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {k: "model.safetensors" for k in load_file(str(d / "model.safetensors"))}
    tensors = {}
    for f in sorted(set(weight_map.values())):
        part = load_file(str(d / f))
        assert {k for k, v in weight_map.items() if v == f} == set(part), f
        tensors.update(part)
    return tensors, weight_map


def assert_converted(out: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    tensors, _ = read_output(out)
    assert set(tensors) == set(sd) - {"lm_head.weight"}
    for name, want in sd.items():
        if name == "lm_head.weight":
            continue
        got = tensors[name]
        want = want if dtype is None else want.to(dtype)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name
    for name, text in SIDE.items():
        assert (out / name).read_text() == text, name


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dtype", [None, "float32", "float16", "bfloat16"])
def test_convert_dtypes(layout, dtype, single_ckpt, sharded_ckpt, tmp_path):
    src, sd = single_ckpt if layout == "single" else sharded_ckpt
    out = tmp_path / "out"
    args = [str(src), str(out), "--verify"] + (["--dtype", dtype] if dtype else [])
    assert cc.main(args) == 0
    assert_converted(out, sd, cc.DTYPES[dtype] if dtype else None)
    # Default 5GB shard size: one file, no index.
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    if layout == "sharded":
        assert all(k.startswith("transformer.") for k in read_output(out)[0])
    else:
        assert not any(k.startswith("transformer.") for k in read_output(out)[0])


def test_lm_head_dropped_and_names_kept(sharded_ckpt, tmp_path):
    src, sd = sharded_ckpt
    assert "lm_head.weight" in sd
    out = tmp_path / "out"
    assert cc.main([str(src), str(out)]) == 0
    tensors, _ = read_output(out)
    assert "lm_head.weight" not in tensors
    assert "transformer.word_embeddings.weight" in tensors
    assert "transformer.h.0.self_attention.query_key_value.weight" in tensors
    assert tensors["transformer.h.0.self_attention.query_key_value.weight"].shape == (96, 32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forced_sharding(dtype, sharded_ckpt, tmp_path):
    src, sd = sharded_ckpt
    out = tmp_path / "out"
    limit = 10_000
    assert cc.main([str(src), str(out), "--dtype", dtype, "--max-shard-size", "10KB", "--verify"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert not list(out.glob("*.tmp.safetensors"))
    tensors, _ = read_output(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:
        with safe_open(str(out / f), framework="pt") as h:
            sizes = [h.get_slice(k).get_shape() for k in h.keys()]
        data = sum(torch.Size(s).numel() for s in sizes) * cc.DTYPES[dtype].itemsize
        assert data <= limit or len(sizes) == 1, (f, data)
    assert_converted(out, sd, cc.DTYPES[dtype])


def test_output_loads_in_transformers(sharded_ckpt, tmp_path):
    """The converted, re-sharded directory is a valid HF checkpoint giving the same outputs."""
    src, sd = sharded_ckpt
    out = tmp_path / "out"
    assert cc.main([str(src), str(out), "--max-shard-size", "10KB"]) == 0
    model, info = BloomModel.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = BloomModel(model.config)
    ref.load_state_dict({k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"})
    ids = torch.tensor([[5, 17, 3, 42, 8, 8, 1]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref.eval()(ids).last_hidden_state)


def test_parse_size():
    assert cc.parse_size("5GB") == 5 * 10**9
    assert cc.parse_size("500MB") == 500 * 10**6
    assert cc.parse_size("2GiB") == 2 * 2**30
    assert cc.parse_size("1000") == 1000
    assert cc.parse_size("1.5kb") == 1500
    with pytest.raises(Exception):
        cc.parse_size("five gigs")


# ---------------------------------------------------------------------------------- errors


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def test_cli_missing_input(tmp_path):
    r = run_cli(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode != 0
    assert "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_no_bin(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"")
    assert cc.main([str(src), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "no pytorch_model.bin" in err and "safetensors" in err


def test_shards_without_index(sharded_ckpt, tmp_path, capsys):
    src, _ = sharded_ckpt
    (src / cc.BIN_INDEX).unlink()
    assert cc.main([str(src), str(tmp_path / "out")]) != 0
    assert "no pytorch_model.bin.index.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "index_text, message",
    [
        ("{not json", "bad index"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {"a.weight": "pytorch_model-00009-of-00009.bin"}}', "not found"),
    ],
)
def test_bad_index(index_text, message, sharded_ckpt, tmp_path, capsys):
    src, _ = sharded_ckpt
    (src / cc.BIN_INDEX).write_text(index_text)
    assert cc.main([str(src), str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err


def test_index_lists_absent_tensor(sharded_ckpt, tmp_path, capsys):
    src, _ = sharded_ckpt
    index = json.loads((src / cc.BIN_INDEX).read_text())
    index["weight_map"]["transformer.h.7.ln.weight"] = "pytorch_model-00001-of-00003.bin"
    (src / cc.BIN_INDEX).write_text(json.dumps(index))
    assert cc.main([str(src), str(tmp_path / "out")]) != 0
    assert "transformer.h.7.ln.weight" in capsys.readouterr().err


def test_existing_output_needs_force(single_ckpt, sharded_ckpt, tmp_path):
    src, sd = single_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    r = run_cli(str(src), str(out))
    assert r.returncode != 0
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]

    # --force over an earlier sharded conversion must not leave its shards behind.
    src2, _ = sharded_ckpt
    assert cc.main([str(src2), str(out), "--force", "--max-shard-size", "10KB"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    r = run_cli(str(src), str(out), "--force", "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert_converted(out, sd, torch.float16)


def test_empty_output_dir_is_fine(single_ckpt, tmp_path):
    src, sd = single_ckpt
    out = tmp_path / "out"
    out.mkdir()
    assert cc.main([str(src), str(out)]) == 0
    assert_converted(out, sd, None)


# ------------------------------------------------------------------ golden fixtures (cheap)


def specb_ids(tok, text: str, kind: str, max_seq_length: int) -> list[int]:
    """docs/semantics.md: rstrip, no special tokens, keep max_seq_length-3 tokens, wrap in [ ] or { }."""
    br = {b: tok.encode(b, add_special_tokens=False).ids[0] for b in "[]{}"}
    ids = tok.encode(text.rstrip(), add_special_tokens=False).ids[: max_seq_length - 3]
    return [br["["], *ids, br["]"]] if kind == "query" else [br["{"], *ids, br["}"]]


@pytest.mark.parametrize("name", ["sgpt-tiny", "tiny-b"])
def test_golden_ids_reproducible(name):
    from tokenizers import Tokenizer

    golden = ROOT / "tests" / "fixtures" / "golden"
    meta = json.loads((golden / f"{name}.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(ROOT / meta["model_dir"] / "tokenizer.json"))
    with safe_open(str(golden / f"{name}.safetensors"), framework="pt") as g:
        for k, entry in enumerate(meta["texts"]):
            want = g.get_tensor(f"ids.{k}")
            got = specb_ids(tok, entry["text"], entry["kind"], meta["max_seq_length"])
            assert want.dtype == torch.int64
            assert want.tolist() == got, (k, entry["text"][:40])
            assert entry["n_tokens"] == len(got) <= meta["max_seq_length"] - 1
            raw = len(tok.encode(entry["text"].rstrip(), add_special_tokens=False).ids)
            assert entry["truncated"] == (raw > meta["max_seq_length"] - 3)
