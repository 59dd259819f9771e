"""Check that docs/semantics.md's forward pass, written out independently in numpy (float64),
reproduces the golden data that transformers' BloomModel produced. This pins the spec itself
(interleaved QKV layout, ALiBi slopes incl. 6 heads, GELU constant, weights 1..n) to the reference,
so the Rust engine can trust either one. It also checks fixture invariants the engine tests rely on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "golden"


def load_model(model_dir: Path):
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = cfg.get("hidden_size", cfg.get("n_embed"))
    layers = cfg.get("n_layer", cfg.get("num_hidden_layers"))
    heads = cfg.get("n_head", cfg.get("num_attention_heads"))
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    w = {}
    for f in files:
        for k, v in load_file(str(model_dir / f)).items():
            if k != "lm_head.weight":
                w[k.removeprefix("transformer.")] = v.astype(np.float64)
    return cfg, hidden, layers, heads, w


def alibi_slopes(n: int) -> np.ndarray:
    p = 2 ** math.floor(math.log2(n))
    slopes = [(2 ** (-8 / p)) ** k for k in range(1, p + 1)]
    slopes += [(2 ** (-4 / p)) ** k for k in range(1, 2 * (n - p), 2)]
    return np.array(slopes)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + np.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def forward(ids, hidden, layers, heads, w, eps):
    d = hidden // heads
    n = len(ids)
    slopes = alibi_slopes(heads)
    x = layer_norm(w["word_embeddings.weight"][ids], w["word_embeddings_layernorm.weight"],
                   w["word_embeddings_layernorm.bias"], eps)
    states = [x]
    causal = np.tril(np.ones((n, n), dtype=bool))
    for i in range(layers):
        p = f"h.{i}."
        a = layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        qkv = a @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        qkv = qkv.reshape(n, heads, 3, d)  # interleaved per head
        ctx = np.empty((n, heads, d))
        for h in range(heads):
            q, k, v = qkv[:, h, 0], qkv[:, h, 1], qkv[:, h, 2]
            s = q @ k.T / math.sqrt(d) + slopes[h] * np.arange(n)[None, :]
            s = np.where(causal, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            ctx[:, h] = pr @ v
        x = x + ctx.reshape(n, hidden) @ w[p + "self_attention.dense.weight"].T + w[p + "self_attention.dense.bias"]
        m = layer_norm(x, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps)
        f = gelu(m @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"])
        x = x + f @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
        if i < layers - 1:
            states.append(x)
    states.append(layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps))
    hs = np.stack(states)
    wts = np.arange(1, n + 1, dtype=np.float64)[:, None]
    emb = (hs[-1] * wts).sum(0) / wts.sum()
    return hs, emb


@pytest.mark.parametrize("name", ["sgpt-tiny", "tiny-b"])
def test_spec_forward_matches_golden(name):
    meta = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    cfg, hidden, layers, heads, w = load_model(ROOT / meta["model_dir"])
    assert (hidden, layers) == (meta["hidden"], meta["layers"])
    g = load_file(str(GOLDEN / f"{name}.safetensors"))
    for k in range(len(meta["texts"])):
        ids = g[f"ids.{k}"]
        hs, emb = forward(ids, hidden, layers, heads, w, cfg["layer_norm_epsilon"])
        want_hs = g[f"hidden.{k}"]
        assert want_hs.dtype == np.float32 and want_hs.shape == hs.shape
        np.testing.assert_allclose(hs, want_hs, atol=3e-5, rtol=1e-5, err_msg=f"text {k}")
        np.testing.assert_allclose(emb, g[f"embedding.{k}"], atol=1e-5, rtol=1e-5, err_msg=f"text {k}")


def test_alibi_slopes_match_spec_examples():
    np.testing.assert_allclose(alibi_slopes(32), [2 ** (-(h + 1) / 4) for h in range(32)])
    np.testing.assert_allclose(alibi_slopes(16), [2 ** (-(h + 1) / 2) for h in range(16)])
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_fixture_invariants():
    a = ROOT / "models" / "sgpt-tiny"
    b = ROOT / "tests" / "fixtures" / "models" / "tiny-b"
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    assert {"hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon"} <= ca.keys()
    assert {"n_embed", "n_layer", "n_head"} <= cb.keys()
    assert not {"hidden_size", "num_hidden_layers", "num_attention_heads"} & cb.keys()
    tok_vocab = len(json.loads((a / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    assert ca["vocab_size"] == tok_vocab and cb["vocab_size"] == tok_vocab + 2
    wa = load_file(str(a / "model.safetensors"))
    assert all(v.dtype == np.float32 and not k.startswith("transformer.") for k, v in wa.items())
    index = json.loads((b / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    wb = {}
    for f in set(index["weight_map"].values()):
        wb.update(load_file(str(b / f)))
    assert set(wb) == set(index["weight_map"]) and "lm_head.weight" in wb
    assert all(v.dtype == np.float16 for v in wb.values())
    assert all(k.startswith("transformer.") for k in wb if k != "lm_head.weight")
    assert a.stat().st_size and sum(p.stat().st_size for p in a.rglob("*") if p.is_file()) < 1_000_000
