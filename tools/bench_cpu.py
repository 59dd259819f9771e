#!/usr/bin/env python3
"""CPU speed comparison: sgpt vs PyTorch (transformers BloomModel, fp32), same machine, same model,
same token sequences, measured in one run.

Run from anywhere (paths are resolved from the repository root):

    python3 tools/bench_cpu.py                         # bloom-560m shape, 128 texts (the real run)
    python3 tools/bench_cpu.py --layers 2 --texts 16   # quick check of the script itself

What it does:
  1. Model: a random BLOOM of the requested shape (default bloom-560m: hidden 1024, 24 layers,
     16 heads, 250880 vocab rows) in --model-dir (default /tmp/sgpt-bench/<shape>), created if
     missing: float32 `model.safetensors` with BloomModel names, streamed to disk one tensor at a
     time (peak memory = the largest tensor, 1 GB for the 560m embedding), weights scaled so that
     activations stay O(1) through all layers; config.json, tokenizer.json (from models/sgpt-tiny),
     sentence_bert_config.json (max_seq_length 300), 1_Pooling/config.json (weighted mean),
     modules.json. Nothing is downloaded.
  2. Corpus: --texts token-id sequences (seeded): ~30% short queries (~10 tokens in [ ]), ~70%
     passages (~80 tokens on average, a tail up to 297 + 2 brackets, in { }); ids drawn from the
     tokenizer's vocabulary; bracket ids from the tokenizer (docs/semantics.md). Written as JSONL ids.
  3. sgpt: `target/release/sgpt bench --device cpu --ids FILE --json OUT --threads N
     --corpus-reps R` (packed batches, no padding; the fastest of --reps R corpus passes). The
     binary is (re)built first unless --no-build.
  4. PyTorch: BloomModel.from_pretrained(fp32), torch.set_num_threads(N), inference_mode, the way
     sentence-transformers runs it: texts sorted by length (longest first), padded batches of size B
     (left padding with <pad> and an attention mask, as BLOOM's tokenizer and the SGPT reference do),
     weighted-mean pooling over the mask; one warm-up batch per B, one pass per B, then R - 1
     more passes at the best B, the fastest kept; throughput counts real tokens only. Plus single-short-query latency (a batch of one 12-token query).
  5. Sanity: a few query texts tokenized per docs/semantics.md in Python and embedded by PyTorch (one at a
     time, no padding) vs `sgpt embed --kind query --output F.npy`: max |diff| and cosine.
  6. Prints a table; writes docs/bench/cpu-<shape>-<date>.md and .json (every number in them is
     measured in this run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from transformers import BloomConfig, BloomModel

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "sgpt-tiny"
PAD_ID = 3
MAX_SEQ_LENGTH = 300

# From docs/semantics.md (vocab rows 250880 for the base checkpoints; 7b1-msmarco has 250682).
SHAPES = {
    "bloom-560m": dict(hidden=1024, layers=24, heads=16, vocab=250880),
    "bloom-1b1": dict(hidden=1536, layers=24, heads=16, vocab=250880),
    "bloom-1b7": dict(hidden=2048, layers=24, heads=16, vocab=250880),
    "bloom-3b": dict(hidden=2560, layers=30, heads=32, vocab=250880),
    "bloom-7b1": dict(hidden=4096, layers=30, heads=32, vocab=250880),
}

# `--sizes`: one run across model sizes, layer counts cut so the whole run takes minutes. Hidden
# 256/512 are BLOOM-like (head dim 64); 1024 is bloom-560m's block, 2048 bloom-1b7's.
SIZES = {
    "h256-L4": dict(hidden=256, layers=4, heads=4, vocab=250880),
    "h512-L6": dict(hidden=512, layers=6, heads=8, vocab=250880),
    "bloom-560m-L4": dict(hidden=1024, layers=4, heads=16, vocab=250880),
    "bloom-1b7-L2": dict(hidden=2048, layers=2, heads=16, vocab=250880),
}

# The ops `sgpt bench --op-times` reports, in forward order.
OPS = ["embed", "layernorm", "qkv", "attention", "dense", "fc1", "gelu", "fc2", "pool"]

SANITY_TEXTS = [
    "What is the capital of France?",
    "How do vaccines work?",
    "fn main() { println!(\"hello\"); }",
    "Sentence embeddings map a text to a vector; similar texts end up close to each other.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Model creation (streamed, memory-conscious)
# --------------------------------------------------------------------------------------------


def bloom_config(shape: dict) -> BloomConfig:
    cfg = BloomConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        n_layer=shape["layers"],
        n_head=shape["heads"],
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
        use_cache=False,
    )
    cfg.architectures = ["BloomModel"]
    return cfg


def init_tensor(name: str, shape: tuple[int, ...], layers: int, seed: int) -> torch.Tensor:
    """Random weights scaled like a trained model: O(1) activations through every layer.

    Embeddings std 0.02 (normalized by word_embeddings_layernorm), LayerNorms near identity,
    q/k/v std 1/sqrt(H) (attention logits O(1): neither uniform nor one-hot), residual-branch
    outputs scaled by 1/sqrt(2L) (GPT-2 style) so the residual stream stays O(1) over depth.
    Each tensor has its own generator (seed, name), so the result does not depend on order.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name == "word_embeddings.weight":
        return r.mul_(0.02)
    if "layernorm" in name or name.startswith("ln_f"):
        return r.mul_(0.05).add_(1.0) if name.endswith("weight") else r.mul_(0.02)
    if name.endswith("bias"):
        return r.mul_(0.01)
    fan_in = shape[1]
    if "query_key_value" in name or "dense_h_to_4h" in name:
        return r.mul_(1.0 / math.sqrt(fan_in))
    if "self_attention.dense" in name or "dense_4h_to_h" in name:
        return r.mul_(1.0 / math.sqrt(fan_in) / math.sqrt(2 * layers))
    raise AssertionError(f"unhandled parameter {name}")


def write_safetensors_streamed(path: Path, specs: list[tuple[str, tuple[int, ...]]], make) -> None:
    """safetensors file written one tensor at a time (float32), never holding the whole model."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in specs:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # data aligned to 8 bytes
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in specs:
            t = make(name, shape).contiguous()
            assert t.dtype == torch.float32 and tuple(t.shape) == tuple(shape), name
            f.write(t.numpy().data)
            del t


def create_model(model_dir: Path, shape: dict, seed: int) -> None:
    cfg = bloom_config(shape)
    with torch.device("meta"):
        meta = BloomModel(cfg)
    specs = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    del meta
    n_params = sum(math.prod(s) for _, s in specs)
    log(f"creating random model in {model_dir}: {n_params / 1e6:.1f} M parameters, "
        f"{4 * n_params / 2**30:.2f} GiB float32 (streamed)")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=model_dir.name + ".tmp-", dir=model_dir.parent))
    try:
        t0 = time.time()
        write_safetensors_streamed(
            tmp / "model.safetensors", specs,
            lambda name, s: init_tensor(name, s, shape["layers"], seed))
        cfg.save_pretrained(tmp)
        shutil.copy(TINY / "tokenizer.json", tmp / "tokenizer.json")
        shutil.copy(TINY / "modules.json", tmp / "modules.json")
        write_json(tmp / "sentence_bert_config.json",
                   {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
        pool = json.loads((TINY / "1_Pooling" / "config.json").read_text())
        pool["word_embedding_dimension"] = shape["hidden"]
        assert pool["pooling_mode_weightedmean_tokens"] is True
        (tmp / "1_Pooling").mkdir()
        write_json(tmp / "1_Pooling" / "config.json", pool)
        write_json(tmp / "bench_model.json", {"shape": shape, "seed": seed, "init": init_tensor.__doc__.strip()})
        tmp.chmod(0o755)
        tmp.rename(model_dir)  # atomic: an interrupted creation never leaves a half model
        log(f"model created in {time.time() - t0:.1f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_model_dir(model_dir: Path, shape: dict) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    got = dict(hidden=cfg.get("hidden_size", cfg.get("n_embed")),
               layers=cfg.get("n_layer", cfg.get("num_hidden_layers")),
               heads=cfg.get("n_head", cfg.get("num_attention_heads")),
               vocab=cfg.get("vocab_size"))
    if got != shape:
        sys.exit(f"error: {model_dir} holds a model of shape {got}, not {shape}; "
                 f"remove it or pass another --model-dir")
    for f in ("model.safetensors", "tokenizer.json"):
        if not (model_dir / f).exists():
            sys.exit(f"error: {model_dir / f} is missing")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def bracket_ids(tok: Tokenizer) -> dict[str, int]:
    return {b: tok.encode(b, add_special_tokens=False).ids[0] for b in "[]{}"}


def specb_query_ids(tok: Tokenizer, text: str) -> list[int]:
    br = bracket_ids(tok)
    ids = tok.encode(text.rstrip(), add_special_tokens=False).ids[: MAX_SEQ_LENGTH - 3]
    return [br["["]] + ids + [br["]"]]


def make_corpus(n: int, tok: Tokenizer, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    br = bracket_ids(tok)
    vocab = tok.get_vocab_size()
    max_text = MAX_SEQ_LENGTH - 3  # 297 text tokens + 2 brackets = 299
    n_queries = round(0.3 * n)
    kinds = ["q"] * n_queries + ["d"] * (n - n_queries)
    rng.shuffle(kinds)
    # Passage lengths: lognormal, mean ~78 text tokens (~80 with brackets), right tail to 297.
    sigma = 0.6
    mu = math.log(78) - sigma**2 / 2
    seqs = []
    for k in kinds:
        if k == "q":
            length = int(np.clip(rng.normal(10, 3), 3, 24))
            open_, close = br["["], br["]"]
        else:
            length = int(np.clip(round(rng.lognormal(mu, sigma)), 8, max_text))
            open_, close = br["{"], br["}"]
        ids = rng.integers(4, vocab, size=length).tolist()  # never the special tokens 0..3
        seqs.append([open_] + ids + [close])
    # The tail must reach the longest sequence the engine accepts: make the longest passage full.
    docs = [i for i, k in enumerate(kinds) if k == "d"]
    if len(docs) >= 8:
        i = max(docs, key=lambda j: len(seqs[j]))
        seqs[i] = [br["{"]] + rng.integers(4, vocab, size=max_text).tolist() + [br["}"]]
    return seqs


def corpus_stats(seqs: list[list[int]], tok: Tokenizer) -> dict:
    br = bracket_ids(tok)
    lens = [len(s) for s in seqs]
    q = sum(1 for s in seqs if s[0] == br["["])
    return {
        "texts": len(seqs), "queries": q, "passages": len(seqs) - q,
        "tokens": sum(lens), "mean_len": sum(lens) / len(lens),
        "median_len": statistics.median(lens), "min_len": min(lens), "max_len": max(lens),
        "p90_len": float(np.percentile(lens, 90)),
        "mean_query_len": (sum(len(s) for s in seqs if s[0] == br["["]) / q) if q else None,
        "mean_passage_len": (sum(len(s) for s in seqs if s[0] == br["{"]) / (len(seqs) - q))
        if len(seqs) > q else None,
    }


# --------------------------------------------------------------------------------------------
# PyTorch baseline
# --------------------------------------------------------------------------------------------


def weighted_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers Pooling(weightedmean): weights = position in the padded tensor (1..L)."""
    w = torch.arange(1, h.shape[1] + 1, dtype=torch.float32).unsqueeze(0) * mask.float()
    num = (h.float() * w.unsqueeze(-1)).sum(1)
    return num / w.sum(1, keepdim=True).clamp(min=1e-9)


def pad_left(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in batch)
    ids = torch.full((len(batch), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, L - len(s):] = torch.tensor(s)
        mask[r, L - len(s):] = 1
    return ids, mask


def torch_embed(model: BloomModel, batch: list[list[int]]) -> np.ndarray:
    ids, mask = pad_left(batch)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return weighted_mean(out.last_hidden_state, mask).numpy()


def torch_bench(model: BloomModel, seqs: list[list[int]], batch_sizes: list[int],
                reps: int = 1) -> list[dict]:
    """One pass per batch size, then reps - 1 more passes at the best one (its fastest pass is
    kept, as `sgpt bench --corpus-reps` keeps sgpt's)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # as sentence-transformers
    sorted_seqs = [seqs[i] for i in order]
    real = sum(len(s) for s in seqs)

    def one_pass(B: int) -> tuple[float, list]:
        batches = [sorted_seqs[i:i + B] for i in range(0, len(sorted_seqs), B)]
        t0 = time.perf_counter()
        for b in batches:
            torch_embed(model, b)
        return time.perf_counter() - t0, batches

    results = []
    for B in batch_sizes:
        torch_embed(model, sorted_seqs[-B:])  # warm-up (the shortest batch: cheap, same code paths)
        noise = Contention()
        sec, batches = one_pass(B)
        padded = sum(len(b) * max(len(s) for s in b) for b in batches)
        r = {"batch_size": B, "seconds": sec, "pass_seconds": [sec], "batches": len(batches),
             "padded_tokens": padded, "padding_overhead": padded / real - 1,
             "other_load": noise.other_load()}
        log(f"  PyTorch B={B:<3} {sec:8.2f} s  {real / sec:10.1f} tok/s  "
            f"{len(seqs) / sec:8.2f} texts/s  (padding +{100 * r['padding_overhead']:.0f}%, "
            f"other load {pct(r['other_load'])})")
        results.append(r)
    best = min(results, key=lambda r: r["seconds"])
    for _ in range(reps - 1):
        noise = Contention()
        sec, _ = one_pass(best["batch_size"])
        best["pass_seconds"].append(sec)
        # other_load: the most seen over all of B's passes (not only the one kept); None if
        # it could never be read.
        loads = [x for x in (best["other_load"], noise.other_load()) if x is not None]
        best["other_load"] = max(loads) if loads else None
        log(f"  PyTorch B={best['batch_size']:<3} {sec:8.2f} s  (again)")
    for r in results:
        r["seconds"] = min(r["pass_seconds"])
        r["tokens_per_s"] = real / r["seconds"]
        r["texts_per_s"] = len(seqs) / r["seconds"]
    return results


class OpClock:
    """Wall time per op of BloomModel's forward, by forward hooks on its modules, in sgpt's op
    names: qkv, dense, fc1, fc2 (the Linear modules), gelu (BloomGelu), layernorm (the 2L + 1
    LayerNorms after the embedding), embed (gather + embedding layernorm), attention (BloomAttention
    minus its two Linears: scores, softmax, context, residual add), other (the rest of the forward:
    mask and ALiBi set-up, the MLP's residual add), pool (weighted mean, timed by the caller)."""

    def __init__(self, model: BloomModel) -> None:
        self.t = {k: 0.0 for k in OPS + ["other"]}
        self.span = {"forward": 0.0, "self_attention": 0.0}
        self.start: dict[int, float] = {}
        self.handles = []
        named = {
            "word_embeddings": "embed", "word_embeddings_layernorm": "embed", "ln_f": "layernorm",
        }
        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            kind = named.get(name) or {
                "input_layernorm": "layernorm", "post_attention_layernorm": "layernorm",
                "query_key_value": "qkv", "dense": "dense", "dense_h_to_4h": "fc1",
                "gelu_impl": "gelu", "dense_4h_to_h": "fc2", "self_attention": "self_attention",
            }.get(leaf)
            if name == "":
                kind = "forward"
            if kind:
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(self._post(kind)))

    def _pre(self, mod, _inp):
        self.start[id(mod)] = time.perf_counter()

    def _post(self, kind: str):
        def hook(mod, _inp, _out):
            dt_ = time.perf_counter() - self.start.pop(id(mod))
            if kind in self.span:
                self.span[kind] += dt_
            else:
                self.t[kind] += dt_
        return hook

    def result(self) -> dict[str, float]:
        t = dict(self.t)
        t["attention"] = self.span["self_attention"] - t["qkv"] - t["dense"]
        t["other"] = self.span["forward"] - sum(t[k] for k in OPS if k != "pool")
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def torch_op_times(model: BloomModel, seqs: list[list[int]], B: int, query: list[int],
                   reps: int) -> dict:
    """Seconds per op over one pass of the corpus at batch size B (as torch_bench) and ms per op
    per query (mean of reps), by OpClock; pooling timed around weighted_mean."""
    out = {"batch_size": B}
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    sorted_seqs = [seqs[i] for i in order]
    for label, batches, n in [("corpus_s", [sorted_seqs[i:i + B] for i in range(0, len(seqs), B)], 1),
                              ("query_ms", [[query]] * reps, reps)]:
        clock = OpClock(model)
        for b in batches:
            ids, mask = pad_left(b)
            h = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            t0 = time.perf_counter()
            weighted_mean(h, mask)
            clock.t["pool"] += time.perf_counter() - t0
        clock.remove()
        scale = 1.0 if label == "corpus_s" else 1e3 / n
        out[label] = {k: v * scale for k, v in clock.result().items()}
    log("  PyTorch op times (corpus s / query ms): " + ", ".join(
        f"{k} {out['corpus_s'][k]:.2f}/{out['query_ms'][k]:.3f}" for k in OPS + ["other"]))
    return out


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[round((len(s) - 1) * p)]  # same nearest-rank rule as `sgpt bench`


def torch_query_latency(model: BloomModel, query: list[int], reps: int) -> dict:
    torch_embed(model, [query])  # warm-up
    noise = Contention()
    lat = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch_embed(model, [query])
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "reps": reps,
            "tokens": len(query), "other_load": noise.other_load()}


# --------------------------------------------------------------------------------------------
# sgpt
# --------------------------------------------------------------------------------------------


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def build_sgpt() -> None:
    log("cargo build --release (sgpt)")
    t0 = time.time()
    run(["cargo", "build", "--release", "--bin", "sgpt"], cwd=ROOT)
    log(f"  build done in {time.time() - t0:.1f} s")


def binary_is_stale(binary: Path) -> bool:
    newest = max(p.stat().st_mtime for p in (ROOT / "src").rglob("*") if p.is_file())
    for extra in ("Cargo.toml", "Cargo.lock"):
        if (ROOT / extra).exists():
            newest = max(newest, (ROOT / extra).stat().st_mtime)
    return binary.stat().st_mtime < newest


def sgpt_bench(binary: Path, model_dir: Path, ids_file: Path, threads: int, reps: int,
               max_batch_tokens: int | None, work: Path, op_times: bool = False,
               corpus_reps: int = 1) -> dict:
    out = work / "sgpt_bench.json"
    cmd = [str(binary), "bench", "--model", str(model_dir), "--device", "cpu", "--ids", str(ids_file),
           "--json", str(out), "--threads", str(threads), "--latency-reps", str(reps)]
    if corpus_reps > 1:
        cmd += ["--corpus-reps", str(corpus_reps)]
    if max_batch_tokens:
        cmd += ["--max-batch-tokens", str(max_batch_tokens)]
    if op_times:
        cmd += ["--op-times"]
    log("  " + " ".join(cmd))
    t0 = time.time()
    noise = Contention()
    p = run(cmd)
    other = noise.other_load()
    for line in p.stdout.strip().splitlines():
        log("  | " + line)
    res = json.loads(out.read_text())
    res["wall_seconds"] = time.time() - t0
    res["other_load"] = other  # over the whole process: model load, corpus and latency
    log(f"  other load during sgpt bench: {pct(other)}")
    res["command"] = " ".join(cmd)
    one = res["latency"]["batch_01"]  # `sgpt bench`: batches of 1, 4, 16 queries
    res["query_latency_ms"] = {"p50": one["p50_ms"], "p99": one["p99_ms"], "reps": reps}
    res["query_tokens"] = one["tokens"]
    return res


def sgpt_embed_queries(binary: Path, model_dir: Path, texts: list[str], threads: int,
                       work: Path) -> np.ndarray:
    out = work / "sgpt_sanity.npy"
    run([str(binary), "embed", "--model", str(model_dir), "--device", "cpu", "--threads", str(threads),
         "--kind", "query", "--quiet", "--output", str(out), *texts])
    return np.load(out)


# --------------------------------------------------------------------------------------------
# Environment / report
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def git_commit() -> str:
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
        return h + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Contention:
    """CPU time used by processes other than this script and its children, over an interval.

    /proc/stat counts every process on the machine (other users' compilers and tests too);
    os.times() counts this script and its finished children. The difference, as a share of the
    machine's capacity, says how noisy the interval was: both engines here use every core, so a
    busy neighbour slows them (OpenMP's spinning barriers in PyTorch especially) and the numbers
    are not a clean comparison.
    """

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal ...
        return (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def other_load(self) -> float | None:
        """Share (0..1) of all CPUs busy with other processes since construction."""
        busy = self._busy()
        wall = time.perf_counter() - self.t
        if busy is None or self.busy is None or wall <= 0:
            return None
        foreign = (busy - self.busy) - (self._own() - self.own)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def idle_check(seconds: float = 2.0) -> float | None:
    c = Contention()
    time.sleep(seconds)
    return c.other_load()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def render_markdown(r: dict) -> str:
    c, s, env = r["corpus"], r["sgpt"], r["environment"]
    best = r["pytorch"]["best"]
    lines = [
        f"# CPU benchmark: sgpt vs PyTorch fp32, {r['shape_name']}",
        "",
        f"Generated by `tools/bench_cpu.py` on {r['date']} (every number below was measured in this run).",
        "",
        f"Command: `{r['command_line']}`",
        "",
        *([f"> **Noisy run:** other processes used up to {pct(r['noise']['max_other_load'])} of the "
           "CPUs during the timed phases (see the \"other load\" column); both engines use every "
           "core, so these numbers are not a clean comparison.", ""] if r["noise"]["noisy"] else []),
        "## Environment",
        "",
        "| | |",
        "|---|---|",
        f"| date (UTC) | {r['date']} |",
        f"| CPU | {env['cpu_model']} ({', '.join(env['cpu_flags']) or 'no AVX2/AVX-512 flags seen'}) |",
        f"| cores (usable / online) | {env['cores_usable']} / {env['cores_online']} |",
        f"| threads used (both engines) | {r['threads']} |",
        f"| memory | {env['mem_gib']} GiB |",
        f"| load average at start / end | {env['loadavg_start']} / {env['loadavg_end']} |",
        f"| CPU used by other processes | before start {pct(r['noise']['other_load_before_start'])}, "
        f"worst timed phase {pct(r['noise']['max_other_load'])} |",
        f"| torch | {env['torch']} (intra-op threads {env['torch_threads']}) |",
        f"| transformers | {env['transformers']} (attention: {env['attn_implementation']}) |",
        f"| sgpt commit | {env['sgpt_commit']} |",
        f"| sgpt backend | {s.get('backend', 'n/a')} |",
        "",
        "## Model",
        "",
        f"Random BLOOM, shape {r['shape_name']}: hidden {r['shape']['hidden']}, {r['shape']['layers']} layers, "
        f"{r['shape']['heads']} heads, {r['shape']['vocab']} vocabulary rows, float32, "
        f"{r['model']['params_millions']:.1f} M parameters ({r['model']['non_embedding_params_millions']:.1f} M "
        f"outside the embedding). Directory: `{r['model']['dir']}`.",
        "",
        "## Corpus",
        "",
        f"{c['texts']} token-id sequences (seed {r['seed']}): {c['queries']} queries (mean "
        f"{fmt(c['mean_query_len'])} tokens with brackets), {c['passages']} passages (mean "
        f"{fmt(c['mean_passage_len'])}); {c['tokens']} tokens in all, mean length {c['mean_len']:.1f}, "
        f"median {c['median_len']:.0f}, p90 {c['p90_len']:.0f}, min {c['min_len']}, max {c['max_len']}.",
        "",
        "## Throughput (corpus)",
        "",
        "PyTorch: sorted by length (longest first), left-padded batches of B with an attention mask, "
        "weighted-mean pooling; tokens/s counts real tokens only. sgpt: packed batches "
        f"(no padding, at most {s.get('max_batch_tokens', 'n/a')} tokens each), corpus order. "
        f"Seconds: the fastest of {len(s.get('corpus_pass_seconds', [0]))} passes for sgpt and "
        f"of {len(best.get('pass_seconds', [0]))} at PyTorch's best B.",
        "",
        "| engine | batch | seconds | tokens/s | texts/s | padding overhead | other load |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in r["pytorch"]["batches"]:
        mark = " (best)" if p["batch_size"] == best["batch_size"] else ""
        lines.append(f"| PyTorch fp32 | B={p['batch_size']}{mark} | {p['seconds']:.2f} | "
                     f"{p['tokens_per_s']:,.1f} | {p['texts_per_s']:,.2f} | "
                     f"+{100 * p['padding_overhead']:.0f}% | {pct(p.get('other_load'))} |")
    lines.append(f"| sgpt | packed | {s['corpus_seconds']:.2f} | {s['tokens_per_s']:,.1f} | "
                 f"{s['texts_per_s']:,.2f} | 0% | {pct(s.get('other_load'))} |")
    ql_t, ql_s = r["pytorch"]["query_latency_ms"], s["query_latency_ms"]
    ratios = r["ratios"]
    lines += [
        "",
        "## Single short query latency (batch of one)",
        "",
        "| engine | tokens | p50 ms | p99 ms | reps | other load |",
        "|---|---:|---:|---:|---:|---:|",
        f"| PyTorch fp32 | {ql_t['tokens']} | {ql_t['p50']:.2f} | {ql_t['p99']:.2f} | {ql_t['reps']} | "
        f"{pct(ql_t.get('other_load'))} |",
        f"| sgpt | {s.get('query_tokens', 'n/a')} | {ql_s['p50']:.2f} | {ql_s['p99']:.2f} | {ql_s['reps']} | "
        f"{pct(s.get('other_load'))} |",
        "",
        "## Ratios (sgpt / PyTorch)",
        "",
        f"- throughput, tokens/s: sgpt / best PyTorch (B={best['batch_size']}) = "
        f"**{ratios['throughput_tokens_per_s']:.2f}x** (higher is better for sgpt)",
        f"- throughput, texts/s: **{ratios['throughput_texts_per_s']:.2f}x**",
        f"- query latency p50: sgpt / PyTorch = **{ratios['query_latency_p50']:.2f}x** "
        f"(lower is better for sgpt; PyTorch / sgpt = {1 / ratios['query_latency_p50']:.2f}x)",
        f"- query latency p99: sgpt / PyTorch = {ratios['query_latency_p99']:.2f}x",
        "",
        "## Sanity: same function",
        "",
    ]
    san = r["sanity"]
    lines += [
        f"{len(san['texts'])} query texts tokenized per docs/semantics.md in Python, embedded by PyTorch one at a "
        f"time (no padding) and by `sgpt embed --kind query`: max |diff| {san['max_abs_diff']:.3e} "
        f"(embedding max |value| {san['max_abs_value']:.3f}), min cosine {san['min_cosine']:.8f} "
        f"-> **{'OK' if san['ok'] else 'MISMATCH'}**.",
        "",
        "## Timing of this run",
        "",
        ", ".join(f"{k} {v:.1f} s" for k, v in r["phase_seconds"].items()),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def write_sizes(args, reports: list[dict], total_s: float) -> None:
    """The combined report of --sizes: one table across sizes, per-op tables, every number from
    this run (the per-size reports are kept whole in the JSON)."""
    date = reports[0]["date"]
    env = reports[0]["environment"]
    noisy = any(r["noise"]["noisy"] for r in reports)
    worst = max((r["noise"]["max_other_load"] or 0.0) for r in reports)
    lines = [
        "# CPU benchmark across sizes: sgpt vs PyTorch fp32",
        "",
        f"Generated by `tools/bench_cpu.py --sizes` on {date} (every number below was measured in "
        f"this run; total {total_s / 60:.1f} min).",
        "",
        f"Command: `{reports[0]['command_line']}`",
        "",
        *([f"> **Noisy run:** other processes used up to {pct(worst)} of the CPUs during the timed "
           "phases (column \"other load\"); both engines use every core, so the comparison is "
           "not clean.", ""] if noisy else []),
        f"Machine: {env['cpu_model']} ({', '.join(env['cpu_flags'])}), {env['cores_usable']} cores, "
        f"{reports[0]['threads']} threads for both engines; torch {env['torch']}, transformers "
        f"{env['transformers']} (attention: {env['attn_implementation']}); sgpt commit "
        f"{env['sgpt_commit']}.",
        "",
        f"Corpus per size: {reports[0]['corpus']['texts']} token-id sequences (seed {reports[0]['seed']}), "
        f"{reports[0]['corpus']['tokens']} tokens, mean length {reports[0]['corpus']['mean_len']:.1f}, "
        f"max {reports[0]['corpus']['max_len']}; the same ids for both engines. PyTorch: length-sorted "
        f"left-padded batches, best of B = {args.batch_sizes}; sgpt: packed batches. Throughput: "
        + (f"each engine's fastest of {args.reps} corpus passes (PyTorch's at its best B). "
           if args.reps > 1 else "one corpus pass per engine. ")
        + "Random weights, 250880 embedding rows, float32.",
        "",
        "| size | hidden | heads | layers | PyTorch tokens/s (B) | sgpt tokens/s | ratio | "
        "PyTorch query p50 ms | sgpt query p50 ms | ratio | other load (max) | sanity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        sh, best, s = r["shape"], r["pytorch"]["best"], r["sgpt"]
        lines.append(
            f"| {r['shape_name']} | {sh['hidden']} | {sh['heads']} | {sh['layers']} | "
            f"{best['tokens_per_s']:,.0f} ({best['batch_size']}) | {s['tokens_per_s']:,.0f} | "
            f"**{r['ratios']['throughput_tokens_per_s']:.2f}×** | "
            f"{r['pytorch']['query_latency_ms']['p50']:.2f} ({r['pytorch']['query_latency_ms']['tokens']} tok) | "
            f"{s['query_latency_ms']['p50']:.2f} ({s.get('query_tokens', 'n/a')} tok) | "
            f"**{r['ratios']['query_latency_p50']:.2f}×** | {pct(r['noise']['max_other_load'])} | "
            f"{'OK' if r['sanity']['ok'] else 'MISMATCH'} ({r['sanity']['max_abs_diff']:.1e}) |")
    lines += ["", "Targets (issue 18): throughput ratio ≥ 1.3×, query ratio ≤ 0.8×.", ""]
    if all(r["sgpt"].get("op_times") and r["pytorch"].get("op_times") for r in reports):
        lines += [
            "## Where the time goes",
            "",
            "Per op, seconds over the whole corpus (sgpt: its packed batches; PyTorch: one more pass "
            "at its best B), each engine timed by a clock between ops (sgpt `bench --op-times`, "
            "PyTorch forward hooks; attention = BloomAttention minus its two Linears, so it holds "
            "the residual add; other = mask/ALiBi set-up and the MLP's residual add). "
            "Second table: ms per op for one query.",
            "",
        ]
        for key, unit in [("corpus_s", "corpus s"), ("query_ms", "query ms")]:
            lines += [f"| {unit}: sgpt / PyTorch | " + " | ".join(OPS + ["other", "total"]) + " |",
                      "|---|" + "---:|" * (len(OPS) + 2)]
            for r in reports:
                so = r["sgpt"]["op_times"]
                sv = {k: so["ops"][k][key] for k in OPS}
                sv["other"] = None
                tv = r["pytorch"]["op_times"][key]
                cells = []
                for k in OPS + ["other"]:
                    a_ = "–" if sv[k] is None else f"{sv[k]:.3g}"
                    cells.append(f"{a_} / {tv[k]:.3g}")
                cells.append(f"{sum(v for v in sv.values() if v):.3g} / {sum(tv.values()):.3g}")
                lines.append(f"| {r['shape_name']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Timing of this run", ""]
    for r in reports:
        lines.append(f"- {r['shape_name']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phase_seconds"].items()))
    lines.append("")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = fresh_stem(args.out_dir, f"cpu-sizes-{date[:10]}")
    write_json(stem.with_suffix(".json"), {"date": date, "total_seconds": total_s, "sizes": reports})
    stem.with_suffix(".md").write_text("\n".join(lines))
    print()
    print("\n".join(lines[lines.index("| size | hidden | heads | layers | PyTorch tokens/s (B) | sgpt tokens/s | ratio | "
                                      "PyTorch query p50 ms | sgpt query p50 ms | ratio | other load (max) | sanity |"):]))
    log(f"wrote {stem}.md and {stem}.json")


def fresh_stem(out_dir: Path, name: str) -> Path:
    """out_dir/name, or name-2, name-3, … if a record of that name exists: a second run on the
    same day (perhaps on another machine) never overwrites the first."""
    stem, n = out_dir / name, 1
    while stem.with_suffix(".md").exists() or stem.with_suffix(".json").exists():
        n += 1
        stem = out_dir / f"{name}-{n}"
    return stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bloom-560m")
    ap.add_argument("--layers", type=int, help="override the shape's layer count (quick runs)")
    ap.add_argument("--model-dir", type=Path, help="default /tmp/sgpt-bench/<shape>")
    ap.add_argument("--texts", type=int, default=128, help="corpus size (default 128)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-sizes", default="1,8,32", help="PyTorch batch sizes (default 1,8,32)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for both engines (default: all usable cores)")
    ap.add_argument("--latency-reps", type=int, default=20, help="query latency repetitions (both)")
    ap.add_argument("--reps", type=int, default=3,
                    help="corpus passes of each engine (PyTorch: at its best batch size); the "
                         "fastest counts (default 3: a shared machine's speed drifts by tens of %%)")
    ap.add_argument("--max-batch-tokens", type=int, help="passed to sgpt bench (default: sgpt's)")
    ap.add_argument("--sgpt", type=Path, default=ROOT / "target" / "release" / "sgpt")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before measuring, wait up to SECONDS for other processes to use < 10%% "
                         "of the CPUs (default 0: just measure and report the load)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "bench",
                    help="where the .md/.json report goes (default docs/bench)")
    ap.add_argument("--sizes", action="store_true",
                    help="run every size of SIZES (hidden 256, 512, 1024, 2048; layer counts cut) "
                         "in one go and write one combined report, cpu-sizes-<date>.md/.json")
    ap.add_argument("--op-times", action="store_true",
                    help="also time each op: `sgpt bench --op-times` and one torch.profiler pass "
                         "(PyTorch's best batch size and the query)")
    args = ap.parse_args()
    if args.reps < 1:
        sys.exit("error: --reps must be >= 1")
    if not args.no_build:
        build_sgpt()
    if args.sizes:
        if args.model_dir or args.layers:
            sys.exit("error: --sizes picks its own models; drop --model-dir/--layers")
        reports = []
        t_start = time.time()
        for name, shape in SIZES.items():
            log(f"=== size {name}: hidden {shape['hidden']}, {shape['heads']} heads, "
                f"{shape['layers']} layers ===")
            reports.append(measure(args, name, dict(shape), Path("/tmp/sgpt-bench") / name))
        write_sizes(args, reports, time.time() - t_start)
        if not all(r["sanity"]["ok"] for r in reports):
            sys.exit(2)
        return
    shape = dict(SHAPES[args.shape])
    shape_name = args.shape
    if args.layers is not None and args.layers != shape["layers"]:
        if args.layers < 1:
            sys.exit("error: --layers must be >= 1")
        shape["layers"] = args.layers
        shape_name = f"{args.shape}-L{args.layers}"
    model_dir = args.model_dir or Path("/tmp/sgpt-bench") / shape_name
    report = measure(args, shape_name, shape, model_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = fresh_stem(args.out_dir, f"cpu-{shape_name}-{report['date'][:10]}")
    write_json(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(render_markdown(report))
    log(f"wrote {stem}.md and {stem}.json (total {report['phase_seconds']['total']:.1f} s)")
    if not report["sanity"]["ok"]:
        sys.exit(2)


def wait_quiet(args) -> float | None:
    idle = idle_check()
    deadline = time.time() + args.wait_quiet
    while idle is not None and idle > 0.10 and time.time() < deadline:
        log(f"other processes use {pct(idle)} of the CPUs; waiting for a quiet moment")
        time.sleep(10)
        idle = idle_check()
    log(f"other processes' CPU use before start: {pct(idle)} of {os.cpu_count()} CPUs "
        f"(load average {loadavg()})")
    if idle is not None and idle > 0.10:
        log("WARNING: the machine is busy; the numbers of this run will be noisy "
            "(PyTorch's OpenMP threads suffer most). Rerun at a quiet moment or with --wait-quiet.")
    return idle


def measure(args, shape_name: str, shape: dict, model_dir: Path) -> dict:
    """One model size: both engines on the same corpus, the sanity check; the report dict."""
    t_start = time.time()
    phases: dict[str, float] = {}
    load_start = loadavg()
    idle = wait_quiet(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    threads = args.threads
    date = dt.datetime.now(dt.timezone.utc)

    # 1. model
    t0 = time.time()
    if not model_dir.exists():
        create_model(model_dir, shape, args.seed)
    else:
        log(f"reusing model in {model_dir}")
    check_model_dir(model_dir, shape)
    phases["model"] = time.time() - t0

    # 2. corpus
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    seqs = make_corpus(args.texts, tok, args.seed)
    stats = corpus_stats(seqs, tok)
    work = Path(tempfile.mkdtemp(prefix="sgpt-bench-"))
    ids_file = work / "ids.jsonl"
    ids_file.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    log(f"corpus: {stats['texts']} texts ({stats['queries']} queries, {stats['passages']} passages), "
        f"{stats['tokens']} tokens, mean {stats['mean_len']:.1f}, max {stats['max_len']} -> {ids_file}")

    # 3. sgpt (first, while the freshly written weights are in the page cache for both engines)
    t0 = time.time()
    if not args.sgpt.exists():
        sys.exit(f"error: {args.sgpt} not found (cargo build --release)")
    if binary_is_stale(args.sgpt):
        log(f"WARNING: {args.sgpt} is older than src/: it may not be the code of the commit reported")
    log(f"sgpt bench ({threads} threads)")
    sres = sgpt_bench(args.sgpt, model_dir, ids_file, threads, args.latency_reps,
                      args.max_batch_tokens, work, args.op_times, args.reps)
    phases["sgpt"] = time.time() - t0

    # 4. PyTorch
    t0 = time.time()
    torch.set_num_threads(threads)
    log(f"PyTorch: loading BloomModel fp32 ({threads} threads)")
    model, info = BloomModel.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"error: loading {model_dir} into BloomModel: {bad}")
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.word_embeddings.weight.numel()
    attn_impl = getattr(model.config, "_attn_implementation", None) or "eager"
    with torch.inference_mode():
        tres = torch_bench(model, seqs, batch_sizes, args.reps)
        br = bracket_ids(tok)
        qrng = np.random.default_rng(args.seed + 1)
        query = [br["["]] + qrng.integers(4, tok.get_vocab_size(), size=10).tolist() + [br["]"]]
        tlat = torch_query_latency(model, query, args.latency_reps)
        log(f"  PyTorch query latency ({len(query)} tokens): p50 {tlat['p50']:.2f} ms, "
            f"p99 {tlat['p99']:.2f} ms")
        best_b = max(tres, key=lambda r: r["tokens_per_s"])["batch_size"]
        tops = torch_op_times(model, seqs, best_b, query, args.latency_reps) if args.op_times else None
        phases["pytorch"] = time.time() - t0

        # 5. sanity: same texts through both engines
        t0 = time.time()
        t_emb = np.stack([torch_embed(model, [specb_query_ids(tok, t)])[0] for t in SANITY_TEXTS])
    del model
    s_emb = sgpt_embed_queries(args.sgpt, model_dir, SANITY_TEXTS, threads, work)
    if s_emb.shape != t_emb.shape:
        sys.exit(f"error: sgpt embed returned {s_emb.shape}, PyTorch {t_emb.shape}")
    cos = (t_emb * s_emb).sum(1) / (np.linalg.norm(t_emb, axis=1) * np.linalg.norm(s_emb, axis=1))
    max_diff = float(np.abs(t_emb - s_emb).max())
    max_val = float(np.abs(t_emb).max())
    sanity = {"texts": SANITY_TEXTS, "max_abs_diff": max_diff, "max_abs_value": max_val,
              "cosines": cos.tolist(), "min_cosine": float(cos.min()),
              "embedding_std": float(t_emb.std()), "finite": bool(np.isfinite(t_emb).all()),
              "ok": bool(np.isfinite(t_emb).all() and cos.min() > 0.9999
                         and max_diff <= 1e-3 * max(1.0, max_val))}
    log(f"sanity: max |diff| {max_diff:.3e} (max |value| {max_val:.3f}), min cosine {cos.min():.8f}, "
        f"embedding std {sanity['embedding_std']:.3f} -> {'OK' if sanity['ok'] else 'MISMATCH'}")
    phases["sanity"] = time.time() - t0
    phases["total"] = time.time() - t_start

    best = max(tres, key=lambda r: r["tokens_per_s"])
    loads = [x for x in [sres.get("other_load"), tlat.get("other_load"),
                         *(r.get("other_load") for r in tres)] if x is not None]
    noisy = bool(loads) and max(loads) > 0.10
    ratios = {
        "throughput_tokens_per_s": sres["tokens_per_s"] / best["tokens_per_s"],
        "throughput_texts_per_s": sres["texts_per_s"] / best["texts_per_s"],
        "query_latency_p50": sres["query_latency_ms"]["p50"] / tlat["p50"],
        "query_latency_p99": sres["query_latency_ms"]["p99"] / tlat["p99"],
    }
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    if sres.get("tokens") != stats["tokens"] or sres.get("texts") != stats["texts"]:
        log(f"WARNING: sgpt counted {sres.get('texts')} texts / {sres.get('tokens')} tokens, "
            f"the corpus has {stats['texts']} / {stats['tokens']}")
    report = {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "command_line": "python3 tools/bench_cpu.py " + " ".join(sys.argv[1:]),
        "shape_name": shape_name, "shape": shape, "seed": args.seed, "threads": threads,
        "environment": {
            "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
            "cores_usable": len(os.sched_getaffinity(0)), "cores_online": os.cpu_count(),
            "mem_gib": mem_gib, "loadavg_start": load_start, "loadavg_end": loadavg(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "attn_implementation": attn_impl,
            "python": platform.python_version(), "sgpt_commit": git_commit(),
            "sgpt_binary": str(args.sgpt),
        },
        "model": {"dir": str(model_dir), "params_millions": n_params / 1e6,
                  "non_embedding_params_millions": (n_params - n_emb) / 1e6},
        "corpus": stats,
        "pytorch": {"batches": tres, "best": best, "query_latency_ms": tlat, "op_times": tops},
        "sgpt": sres,
        "ratios": ratios,
        "noise": {"other_load_before_start": idle, "max_other_load": max(loads) if loads else None,
                  "noisy": noisy, "threshold": 0.10},
        "sanity": sanity,
        "phase_seconds": phases,
    }

    # 6. table + report files
    print()
    print(f"{'engine':<14}{'batch':>8}{'seconds':>10}{'tokens/s':>12}{'texts/s':>10}{'pad':>7}")
    for p in tres:
        print(f"{'PyTorch fp32':<14}{'B=' + str(p['batch_size']):>8}{p['seconds']:>10.2f}"
              f"{p['tokens_per_s']:>12.1f}{p['texts_per_s']:>10.2f}{100 * p['padding_overhead']:>6.0f}%")
    print(f"{'sgpt':<14}{'packed':>8}{sres['corpus_seconds']:>10.2f}{sres['tokens_per_s']:>12.1f}"
          f"{sres['texts_per_s']:>10.2f}{0:>6.0f}%")
    print(f"query latency p50/p99 ms: PyTorch {tlat['p50']:.2f}/{tlat['p99']:.2f} ({tlat['tokens']} tokens), "
          f"sgpt {sres['query_latency_ms']['p50']:.2f}/{sres['query_latency_ms']['p99']:.2f} "
          f"({sres.get('query_tokens')} tokens)")
    print(f"sgpt / best PyTorch (B={best['batch_size']}): throughput {ratios['throughput_tokens_per_s']:.2f}x, "
          f"query latency p50 {ratios['query_latency_p50']:.2f}x (lower is better)")
    print(f"sanity: {'OK' if sanity['ok'] else 'MISMATCH'} (max |diff| {max_diff:.2e}, "
          f"min cosine {cos.min():.8f})")
    if noisy:
        print(f"WARNING: NOISY RUN: other processes used up to {pct(max(loads))} of the CPUs "
              "during the measurements; the comparison is not clean.")

    shutil.rmtree(work, ignore_errors=True)
    return report

if __name__ == "__main__":
    main()
