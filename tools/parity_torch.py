#!/usr/bin/env python3
"""Parity of sgpt against transformers on the same machine, at real BLOOM shapes, random weights.

For each shape: build a random BloomModel (weights scaled like a trained model's: linear and
embedding std 0.02 as BLOOM's initializer, layernorm weights 1 + 0.1·N(0,1), biases 0.02·N(0,1)),
round every weight to f16 so both engines see identical values, save it as an sgpt model
directory (f16 safetensors + the shipped tokenizer), embed a set of texts with
  - the reference: transformers BloomModel in fp32 on the device, one text at a time, with
    weighted-mean pooling (weights 1..n), tokenized per docs/semantics.md (specb brackets, 297 tokens);
  - sgpt: `sgpt embed --device cuda --dtype f16|bf16` on the same texts;
and report the cosine and the max |Δ| per text. Bars (the [cuda] issue): cosine ≥ 0.9999 in
f16, ≥ 0.999 in bf16.

The device script runs it with --shapes bloom-560m,bloom-7b1. Locally it can be smoke-tested
on the CPU: --device cpu --sgpt-device cpu --layers 2 --shapes bloom-560m.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import BloomConfig, BloomModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "sgpt-tiny"
SHAPES = {  # hidden, layers, heads (docs/semantics.md)
    "bloom-560m": (1024, 24, 16),
    "bloom-1b1": (1536, 24, 16),
    "bloom-3b": (2560, 30, 32),
    "bloom-7b1": (4096, 30, 32),
}
BARS = {"f16": 0.9999, "bf16": 0.999}
WORDS = ("the of and to in is was for on as with by at from that this which be are it an or "
         "model embedding search query document retrieval language vector semantic ranking "
         "Paris France capital river city population science protein cell energy market "
         "北京 東京 الرياض emoji 🙂 [x] {y} (z) 2023 3.14 …").split()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_texts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        kind = "query" if i % 3 == 0 else "document"
        # queries short; documents up to past the 297-token limit (a few are truncated)
        words = rng.randint(3, 12) if kind == "query" else rng.choice([20, 60, 120, 400])
        texts.append({"text": " ".join(rng.choice(WORDS) for _ in range(words)), "kind": kind})
    return texts


def specb_ids(tok: Tokenizer, text: str, kind: str, max_seq_length: int = 300) -> list[int]:
    first = lambda s: tok.encode(s, add_special_tokens=False).ids[0]  # noqa: E731
    open_, close = (first("["), first("]")) if kind == "query" else (first("{"), first("}"))
    ids = tok.encode(text.rstrip(), add_special_tokens=False).ids[: max_seq_length - 3]
    return [open_] + ids + [close]


def make_model(shape: str, layers: int | None, workdir: Path, device: str) -> tuple[BloomModel, Path]:
    hidden, n_layer, heads = SHAPES[shape]
    n_layer = layers or n_layer
    name = shape if layers is None else f"{shape}-L{n_layer}"
    cfg = BloomConfig(vocab_size=250880, hidden_size=hidden, n_layer=n_layer, n_head=heads,
                      layer_norm_epsilon=1e-5, initializer_range=0.02)
    torch.manual_seed(0)
    t = time.time()
    with torch.device(device):
        model = BloomModel(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layernorm" in pname or pname.startswith("ln_f"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if pname.endswith("weight") else 0.02 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02)
            p.copy_(p.half().float())  # both engines see the same f16 values
    log(f"{name}: random model built on {device} in {time.time() - t:.1f} s")
    out = workdir / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t = time.time()
    save_file({k: v.detach().half().contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    cfg.to_json_file(str(out / "config.json"))
    shutil.copy(TINY / "tokenizer.json", out / "tokenizer.json")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 300, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    pooling = json.loads((TINY / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = hidden
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    log(f"{name}: saved f16 safetensors to {out} in {time.time() - t:.1f} s")
    return model, out


@torch.inference_mode()
def reference(model: BloomModel, seqs: list[list[int]], device: str) -> np.ndarray:
    embs = []
    for ids in seqs:
        x = torch.tensor([ids], device=device)
        h = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0].float()
        w = torch.arange(1, len(ids) + 1, device=device, dtype=torch.float32)[:, None]
        embs.append(((h * w).sum(0) / w.sum()).cpu().numpy())
    return np.stack(embs)


def run_sgpt(sgpt: str, model_dir: Path, texts: list[dict], dtype: str, device: str, workdir: Path) -> tuple[np.ndarray, float]:
    inp, out = workdir / "texts.jsonl", workdir / f"out-{dtype}.npy"
    inp.write_text("".join(json.dumps(t) + "\n" for t in texts))
    # The CPU computes in f32 and refuses --dtype.
    cmd = [sgpt, "embed", "--model", str(model_dir), "--device", device,
           "--input", str(inp), "--output", str(out), "--quiet", "--allow-empty"]
    if device != "cpu":
        cmd += ["--dtype", dtype]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sgpt failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return np.load(out), time.time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sgpt", required=True, help="path to the sgpt binary")
    ap.add_argument("--shapes", default="bloom-560m,bloom-7b1")
    ap.add_argument("--dtypes", default="f16,bf16")
    ap.add_argument("--texts", type=int, default=24)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    ap.add_argument("--device", default="cuda", help="where the reference runs")
    ap.add_argument("--sgpt-device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sgpt-parity"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    texts = make_texts(args.texts, seed=7)
    seqs = [specb_ids(tok, t["text"], t["kind"]) for t in texts]
    log(f"{len(texts)} texts, {sum(map(len, seqs))} tokens, longest {max(map(len, seqs))}")
    results, ok = [], True
    for shape in args.shapes.split(","):
        model, model_dir = make_model(shape, args.layers, args.workdir, args.device)
        t = time.time()
        ref = reference(model, seqs, args.device)
        ref_s = time.time() - t
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        log(f"{shape}: reference fp32 in {ref_s:.1f} s")
        for dtype in args.dtypes.split(","):
            got, sgpt_s = run_sgpt(args.sgpt, model_dir, texts, dtype, args.sgpt_device, args.workdir)
            cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
            diff = np.abs(got - ref)
            worst = int(np.argmin(cos))
            bar = BARS[dtype] if args.sgpt_device == "cuda" else 0.99999
            passed = bool(cos.min() >= bar)
            ok &= passed
            r = {"shape": shape, "layers": args.layers or SHAPES[shape][1], "dtype": dtype, "texts": len(texts),
                 "tokens": sum(map(len, seqs)), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                 "worst_text": worst, "worst_text_tokens": len(seqs[worst]), "max_abs_diff": float(diff.max()),
                 "max_abs_ref": float(np.abs(ref).max()), "bar": bar, "passed": passed,
                 "sgpt_seconds": sgpt_s, "reference_seconds": ref_s}
            results.append(r)
            log(f"{shape} {dtype}: min cosine {cos.min():.7f} (bar {bar}), max |Δ| {diff.max():.3e} "
                f"(max |ref| {np.abs(ref).max():.3f}) -> {'ok' if passed else 'FAILED'}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "torch": torch.__version__,
                                         "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}, indent=2))
    if args.markdown:
        rows = ["| shape | dtype | texts | min cosine | bar | max abs diff | max abs ref | result |", "|---|---|---:|---:|---:|---:|---:|---|"]
        rows += [f"| {r['shape']} (L={r['layers']}) | {r['dtype']} | {r['texts']} | {r['min_cosine']:.7f} | {r['bar']} | "
                 f"{r['max_abs_diff']:.3e} | {r['max_abs_ref']:.3f} | {'pass' if r['passed'] else '**FAIL**'} |" for r in results]
        args.markdown.write_text("\n".join(rows) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
