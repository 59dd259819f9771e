#!/usr/bin/env python3
"""Build the tiny SGPT-BLOOM models and the golden reference data the Rust engine is tested against.

Run from the repository root:

    python3 tools/make_fixtures.py

Writes (deterministically, everything seeded, nothing downloaded):

  models/sgpt-tiny/                 model A, shipped with the repo: hidden 64, 2 layers, 4 heads,
                                    float32 `model.safetensors` with BloomModel names (no prefix),
                                    new-style config keys, max_seq_length 300.
  tests/fixtures/models/tiny-b/     model B: hidden 96, 3 layers, 6 heads (not a power of two, so
                                    ALiBi's extra slopes are exercised), vocab = tokenizer + 2,
                                    old config keys (n_embed), float16, BloomForCausalLM names
                                    (`transformer.` prefix + lm_head) sharded over 2 files,
                                    max_seq_length 64.
  tests/fixtures/golden/<name>.safetensors / .json
                                    per text: ids, all hidden states, pooled embedding, computed by
                                    transformers' BloomModel (float32) + sentence-transformers' Pooling,
                                    one text at a time (batch of 1, so pooling weights are 1..n).

Semantics follow docs/semantics.md (specb brackets, rstrip, right truncation to max_seq_length-3).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

_T0 = time.time()  # the summary's timing includes the (slow) torch/transformers imports

# The reference must never touch the network; everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import sentence_transformers
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BloomConfig, BloomForCausalLM, BloomModel

try:  # sentence-transformers >= 6 moved the modules; `models` is a deprecated alias there.
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.models import Pooling

ROOT = Path(__file__).resolve().parent.parent
SEED = 20240229
VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM
# BLOOM's pre-tokenizer regex, verbatim (Oniguruma semantics: the inner `[...]` is a nested class).
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

CORPUS = [
    # English prose
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Sentence embeddings map a text to a vector; similar texts end up close to each other in that space.",
    "Search engines retrieve documents for a query, then rank them by how relevant they are to the question.",
    "What is the capital of France? Paris is the capital and the most populous city of France.",
    "Large language models are trained on huge corpora of web pages, books, code and scientific articles.",
    "The weather today is sunny with a light breeze, perfect for a walk in the park or a bike ride.",
    "Researchers evaluated the model on many retrieval benchmarks and reported the average score.",
    "How do vaccines work? They train the immune system to recognise a virus without causing the disease.",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon; Neil Armstrong stepped out first.",
    "Please remember to water the plants, feed the cat, and lock the door before you leave the house!",
    "Climate change affects rainfall, sea levels and the frequency of extreme weather events worldwide.",
    "She said: \"I'll be there at 10:30, don't wait for me.\" Then she left, without another word...",
    # Code-like text with lots of brackets
    "fn main() { let v: Vec<u32> = vec![1, 2, 3]; println!(\"{:?}\", v[0]); }",
    "def forward(self, x): return self.ln_f(x[:, -1, :]) if x.ndim == 3 else {'out': x}",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // dot product",
    "{\"name\": \"sgpt\", \"layers\": [1, 2, 3], \"config\": {\"hidden\": 64}}",
    "SELECT id, title FROM docs WHERE score > 0.5 ORDER BY score DESC LIMIT 10;",
    "[x for x in range(10) if x % 2 == 0] {k: v for k, v in items} [[0, 1], [2, 3]] {[()]}",
    "<div class=\"main\"><a href=\"https://example.com/?q=test&lang=en\">link</a></div>",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"hello\\n\");\n\treturn 0;\n}",
    # Chinese and Japanese
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。今天天气很好。",
    "我们使用句子向量来检索相关的文档，然后根据相似度排序。",
    "東京は日本の首都です。桜の季節はとても美しいです。ありがとうございます。",
    "カタカナとひらがなと漢字を混ぜて書きます。コンピューターで検索する。",
    # Arabic, Hindi, Urdu
    "ما هي عاصمة المملكة العربية السعودية؟ الرياض هي العاصمة، وهي أكبر مدينة.",
    "اللغة العربية جميلة، وتكتب من اليمين إلى اليسار.",
    "भारत एक विशाल देश है। यहाँ कई भाषाएँ बोली जाती हैं।",
    "پاکستان کا دارالحکومت اسلام آباد ہے۔ یہ ایک خوبصورت شہر ہے۔",
    # Emoji, including ZWJ sequences, skin tones and flags
    "I ❤️ my family 👨‍👩‍👧‍👦 and my dog 🐕‍🦺! 🏳️‍🌈 👍🏽 🎉🎉🎉 😀😃😄",
    "Good morning ☀️ coffee ☕ and code 💻 👩‍💻 🚀 ✨",
    # Mixed punctuation and whitespace
    "Wait… what?! 好的。是，不、对 — «quoted» ¿sí? ¡Hola! ।۔،",
    "tabs\tand\nnewlines\r\n  and   multiple    spaces",
    "1234567890 3.14159 2,718 1e-5 0x1F 100% $42.00 #hashtag @user",
]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk_token: every byte is in the alphabet
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so its counts dominate the merges; training itself is deterministic.
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    for b in "[]{}":
        assert len(tok.encode(b, add_special_tokens=False).ids) == 1, b
    return tok


def bracket_ids(tok: Tokenizer) -> dict[str, int]:
    return {b: tok.encode(b, add_special_tokens=False).ids[0] for b in "[]{}"}


def specb_ids(tok: Tokenizer, text: str, kind: str, max_seq_length: int) -> tuple[list[int], bool]:
    """docs/semantics.md tokenization: rstrip, no special tokens, right-truncate to max_seq_length-3, brackets."""
    br = bracket_ids(tok)
    ids = tok.encode(text.rstrip(), add_special_tokens=False).ids
    limit = max_seq_length - 3
    truncated = len(ids) > limit
    ids = ids[:limit]
    open_, close = ("[", "]") if kind == "query" else ("{", "}")
    return [br[open_]] + ids + [br[close]], truncated


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial random weights: every LayerNorm/bias random, attention far from uniform.

    Default init (LN weight 1, bias 0, std 0.02) would hide bugs such as a missing LN bias or
    swapped q/k, so every parameter gets a distinct, O(1)-preserving distribution.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            r = torch.randn(shape, generator=gen, dtype=torch.float32)
            if "word_embeddings.weight" in name:
                v = r  # std 1, like the pre-LN embeddings of real checkpoints
            elif "layernorm" in name or "ln_f" in name:
                v = 1.0 + 0.2 * r if name.endswith("weight") else 0.1 * r
            elif name.endswith("bias"):
                v = 0.02 * r
            elif "query_key_value" in name:
                # std 1.5/sqrt(H): q.k/sqrt(d) ~ O(1.5^2), so softmax is peaked but not one-hot.
                v = r * (1.5 / shape[1] ** 0.5)
            elif "dense_4h_to_h" in name or "self_attention.dense" in name:
                # Residual branches: keep their contribution O(1) so deep states don't blow up.
                v = r * (0.7 / shape[1] ** 0.5)
            elif "dense_h_to_4h" in name:
                v = r * (1.0 / shape[1] ** 0.5)
            else:
                raise AssertionError(f"unhandled parameter {name}")
            p.copy_(v)


def pooling_config(dim: int) -> dict:
    # Legacy sentence-transformers keys, as in the published sgpt-bloom-7b1-msmarco/1_Pooling.
    return {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": True,
        "pooling_mode_lasttoken": False,
    }


MODULES_JSON = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Save with merges as "a b" strings, the (older) format of BLOOM's published tokenizer.json.

    tokenizers >= 0.20 writes [a, b] pairs; both parse, but the engine should see what BLOOM ships.
    Byte-level tokens never contain a literal space, so the string form is unambiguous.
    """
    obj = json.loads(tok.to_str())
    merges = obj["model"]["merges"]
    assert all(" " not in a and " " not in b for a, b in merges)
    obj["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    reloaded = Tokenizer.from_file(str(path))
    for text in CORPUS:
        assert reloaded.encode(text).ids == tok.encode(text).ids


def write_st_files(out: Path, tok: Tokenizer, hidden: int, max_seq_length: int) -> None:
    save_tokenizer(tok, out / "tokenizer.json")
    write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write_json(out / "modules.json", MODULES_JSON)
    write_json(out / "1_Pooling" / "config.json", pooling_config(hidden))


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_model_a(tok: Tokenizer, out: Path) -> None:
    """sgpt-tiny: float32, BloomModel names, new config keys."""
    fresh_dir(out)
    cfg = BloomConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    cfg.architectures = ["BloomModel"]
    model = BloomModel(cfg)
    randomize_(model, torch.Generator().manual_seed(SEED + 1))
    cfg.save_pretrained(out)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_st_files(out, tok, 64, 300)
    c = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon"):
        assert key in c, key


def make_model_b(tok: Tokenizer, out: Path) -> None:
    """tiny-b: float16, BloomForCausalLM names (+lm_head) in 2 shards, old config keys."""
    fresh_dir(out)
    # +2 placeholder rows past the tokenizer, like sgpt-bloom-7b1 (250680 tokens, 250682 rows).
    cfg = BloomConfig(
        vocab_size=tok.get_vocab_size() + 2, hidden_size=96, n_layer=3, n_head=6, layer_norm_epsilon=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    cfg.architectures = ["BloomForCausalLM"]
    model = BloomForCausalLM(cfg)
    randomize_(model.transformer, torch.Generator().manual_seed(SEED + 2))
    cfg.save_pretrained(out)
    # Rewrite with the old key spellings found in older BLOOM/SGPT configs.
    c = json.loads((out / "config.json").read_text())
    c["n_embed"] = c.pop("hidden_size")
    for new in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert new not in c, new
    c["dtype"] = "float16"
    write_json(out / "config.json", dict(sorted(c.items())))

    # lm_head is tied to the embeddings; clone so safetensors doesn't see shared storage.
    sd = {k: v.detach().to(torch.float16).clone().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd and all(k == "lm_head.weight" or k.startswith("transformer.") for k in sd)
    # Split by cumulative size at the halfway mark (like HF sharding; may cut a layer in two).
    total = sum(t.numel() * t.element_size() for t in sd.values())
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    acc = 0
    for k, t in sd.items():
        shards[0 if acc < total // 2 else 1][k] = t
        acc += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_st_files(out, tok, 96, 64)


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(str(model_dir / f)))
    return {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}


# --------------------------------------------------------------------------------------------
# Golden data
# --------------------------------------------------------------------------------------------

LONG_TEXT = " ".join(
    [
        "Retrieval with sentence embeddings works in two steps.",
        "First, every document of the collection is encoded once and the vectors are stored in an index;",
        "then each incoming query is encoded with the same model, and the documents whose vectors have the",
        "highest cosine similarity with the query vector are returned, best first.",
        "Decoder models such as BLOOM read the text from left to right, so the last tokens have seen the",
        "whole sentence; weighted mean pooling therefore gives later positions larger weights (1, 2, 3, ...).",
        "Special brackets tell the model whether it reads a query [like this] or a document {like this}.",
        "数据检索：先编码文档，再编码查询，然后按相似度排序。",
        "السؤال والجواب، ثم الترتيب حسب التشابه.",
        "Emoji too: 🔍📄➡️📊 👩‍🔬 and code: fn score(q: &[f32], d: &[f32]) -> f32 { dot(q, d) / (norm(q) * norm(d)) }",
        "This paragraph is deliberately long so that it is cut at the maximum sequence length: the engine must",
        "keep the first tokens, drop the rest, and still close the sequence with the right bracket.",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore",
        "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut",
        "aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum",
        "dolore eu fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui",
        "officia deserunt mollit anim id est laborum.",
    ]
)

TEXTS: list[tuple[str, str]] = [
    ("", "query"),
    ("   \n\t ", "document"),
    ("   leading whitespace is kept, trailing whitespace is removed  \t\n ", "query"),
    ("What is the capital of France?", "query"),
    (
        "Paris is the capital and most populous city of France. With an estimated population of "
        "2,102,650 residents in January 2023, it is the centre of the Île-de-France region.",
        "document",
    ),
    ("北京是中华人民共和国的首都，也是全国的政治、文化中心。", "document"),
    ("東京は日本の首都です。桜の季節はとても美しい！", "query"),
    ("ما هي عاصمة المملكة العربية السعودية؟ الرياض، طبعا.", "query"),
    ("I ❤️ my family 👨‍👩‍👧‍👦 and my dog 🐕‍🦺! 🏳️‍🌈 👍🏽", "document"),
    ("[[{x}]] {[()]}", "query"),
    ("Wait… what?! 好的。是，不、对 ¿sí? ।۔، end.", "document"),
    ("unit separator at the end\x1f", "query"),  # Python's rstrip strips \x1c-\x1f; Rust's trim_end doesn't
    ("the </s> and <pad> strings inside a text become special ids", "document"),  # added tokens match
    ("fn main() {\n\tlet v = vec![1, 2, 3];\n\tprintln!(\"{:?}\", v[0]);\n}", "query"),
    (
        "How do decoder-only language models produce sentence embeddings for semantic search, and why does "
        "weighted mean pooling over the last hidden layer work better than taking the last token alone?",
        "query",
    ),
    (LONG_TEXT, "document"),
]


def golden(name: str, model_dir: Path, max_seq_length: int, hidden: int) -> dict:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))  # exactly what the engine will read
    cfg_layers = json.loads((model_dir / "config.json").read_text())["n_layer"]
    model, info = BloomModel.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    # transformers 5 defaults to dtype="auto" and silently random-inits missing keys: check both.
    assert not info["missing_keys"], info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"lm_head.weight"}, info["unexpected_keys"]
    assert model.config.hidden_size == hidden and model.config.n_layer == cfg_layers
    on_disk = read_checkpoint(model_dir)
    loaded = model.state_dict()
    assert set(on_disk) == set(loaded), set(on_disk) ^ set(loaded)
    for k, v in on_disk.items():
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.to(torch.float32)), k

    pooling = Pooling(hidden, pooling_mode="weightedmean")
    # The legacy-format 1_Pooling/config.json must load to the same module.
    loaded_pool = Pooling.load(str(model_dir), subfolder="1_Pooling", local_files_only=True)
    assert loaded_pool.pooling_mode == "weightedmean" and loaded_pool.get_embedding_dimension() == hidden

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for k, (text, kind) in enumerate(TEXTS):
        ids, truncated = specb_ids(tok, text, kind, max_seq_length)
        n = len(ids)
        input_ids = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones_like(input_ids)
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hs = torch.stack(out.hidden_states, dim=0)[:, 0]  # [L+1, n, H]
            emb = pooling({"token_embeddings": out.last_hidden_state, "attention_mask": mask})["sentence_embedding"][0]
        assert hs.shape == (cfg_layers + 1, n, hidden)
        assert torch.equal(hs[-1], out.last_hidden_state[0])
        # Independent check of the pooling semantics: weights 1..n.
        w = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
        manual = (hs[-1] * w).sum(0) / w.sum()
        assert torch.allclose(emb, manual, atol=1e-6, rtol=0), (emb - manual).abs().max()
        assert torch.isfinite(hs).all() and torch.isfinite(emb).all()
        tensors[f"ids.{k}"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"hidden.{k}"] = hs.contiguous().clone()
        tensors[f"embedding.{k}"] = emb.contiguous().clone()
        entries.append({"text": text, "kind": kind, "n_tokens": n, "truncated": truncated})

    out_dir = ROOT / "tests" / "fixtures" / "golden"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata={"format": "pt"})
    meta = {
        "model_dir": model_dir.relative_to(ROOT).as_posix(),
        "max_seq_length": max_seq_length,
        "layers": cfg_layers,
        "hidden": hidden,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "texts": entries,
    }
    write_json(out_dir / f"{name}.json", meta)
    return {"tensors": tensors, "meta": meta, "model": model}


def attention_peakedness(model: BloomModel, ids: list[int]) -> float:
    """Mean max attention probability over rows with >= 8 keys (1/len would mean uniform)."""
    with torch.no_grad():
        att = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False).attentions
    vals = [a[0, :, i, : i + 1].max(-1).values.mean().item() for a in att for i in range(8, len(ids))]
    return float(np.mean(vals))


def summarize(name: str, g: dict) -> None:
    meta, tensors = g["meta"], g["tensors"]
    embs = torch.stack([tensors[f"embedding.{k}"] for k in range(len(meta["texts"]))])
    hid = torch.cat([tensors[f"hidden.{k}"].reshape(-1) for k in range(len(meta["texts"]))])
    cos = torch.nn.functional.normalize(embs, dim=-1) @ torch.nn.functional.normalize(embs, dim=-1).T
    off = cos[~torch.eye(len(embs), dtype=torch.bool)]
    print(f"\n== {name}: layers {meta['layers']}, hidden {meta['hidden']}, max_seq_length {meta['max_seq_length']}")
    print(f"   hidden states: std {hid.std():.3f}, max |h| {hid.abs().max():.3f}")
    print(f"   embeddings: norm {embs.norm(dim=-1).min():.3f}..{embs.norm(dim=-1).max():.3f}, "
          f"pairwise cosine {off.min():.3f}..{off.max():.3f}")
    long_k = max(range(len(meta["texts"])), key=lambda k: meta["texts"][k]["n_tokens"])
    ids = tensors[f"ids.{long_k}"].tolist()
    print(f"   mean max attention prob (uniform would be ~{np.mean([1 / (i + 1) for i in range(8, len(ids))]):.3f}):"
          f" {attention_peakedness(g['model'], ids):.3f}")
    for k, t in enumerate(meta["texts"]):
        print(f"   [{k:2d}] {t['kind']:8s} n={t['n_tokens']:3d}{' (truncated)' if t['truncated'] else '':12s} {t['text'][:48]!r}")
    # Distinct token sequences must give distinct embeddings.
    seqs = [tuple(tensors[f"ids.{k}"].tolist()) for k in range(len(embs))]
    for i in range(len(embs)):
        for j in range(i):
            assert seqs[i] == seqs[j] or (embs[i] - embs[j]).abs().max() > 1e-3, (i, j)


def main() -> int:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    tok = build_tokenizer()
    assert "unit separator at the end\x1f".rstrip() == "unit separator at the end"

    a_dir = ROOT / "models" / "sgpt-tiny"
    b_dir = ROOT / "tests" / "fixtures" / "models" / "tiny-b"
    make_model_a(tok, a_dir)
    make_model_b(tok, b_dir)

    ga = golden("sgpt-tiny", a_dir, 300, 64)
    gb = golden("tiny-b", b_dir, 64, 96)
    assert any(t["truncated"] for t in ga["meta"]["texts"]), "model A needs a text over 297 tokens"
    assert ga["meta"]["texts"] and all(t["n_tokens"] <= 299 for t in ga["meta"]["texts"])

    print(f"tokenizer: vocab {tok.get_vocab_size()}, brackets {bracket_ids(tok)}")
    summarize("sgpt-tiny", ga)
    summarize("tiny-b", gb)

    print("\nfiles:")
    for d in (a_dir, b_dir, ROOT / "tests" / "fixtures" / "golden"):
        for p in sorted(d.rglob("*")):
            if p.is_file():
                print(f"   {p.relative_to(ROOT).as_posix():60s} {p.stat().st_size:>9,d} B")
    print(f"\ndone in {time.time() - _T0:.1f} s (including imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
