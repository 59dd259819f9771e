#!/usr/bin/env python3
"""The PyTorch baseline for `sgpt bench`: transformers BloomModel in fp16 on the same GPU, the
way a sentence-transformers user embeds a corpus today (length-sorted, padded batches with an
attention mask, weighted-mean pooling), at several batch sizes; the best one is the baseline.

Writes the token-id corpus it used (--write-ids, JSONL, one array per line) so `sgpt bench --ids`
times exactly the same sequences, and a JSON result (--json) with "tokens_per_s" (best batch
size) and "query_p50_ms" (one short query alone) that `sgpt bench --baseline` reads:

    python3 tools/bench_torch_gpu.py --shape bloom-7b1 --write-ids /tmp/ids.jsonl --json /tmp/torch.json
    sgpt bench --shape bloom-7b1 --device cuda --ids /tmp/ids.jsonl --baseline /tmp/torch.json

Random weights at the named shape (speed does not depend on their values); the corpus mix is
sgpt's synthetic one: ~30% queries of 10–16 tokens, passages averaging ~80 tokens, tail to 299.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BloomConfig, BloomModel

SHAPES = {"bloom-560m": (1024, 24, 16), "bloom-1b1": (1536, 24, 16), "bloom-1b7": (2048, 24, 16),
          "bloom-3b": (2560, 30, 32), "bloom-7b1": (4096, 30, 32)}


def corpus(n: int, seed: int = 1234) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            ids = [62] + [rng.randrange(4, 250000) for _ in range(rng.randint(8, 14))] + [64]
        else:
            base = sum(rng.randint(0, 53) for _ in range(3))
            length = min(max(base * 2 + 80 if rng.random() < 0.125 else base, 1), 297)
            ids = [94] + [rng.randrange(4, 250000) for _ in range(length)] + [96]
        out.append(ids)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def embed(model, seqs: list[list[int]], batch: int, device: str) -> None:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for b in range(0, len(order), batch):
        group = [seqs[i] for i in order[b:b + batch]]
        width = max(map(len, group))
        ids = torch.full((len(group), width), 3, dtype=torch.long)  # <pad>, left padding as SGPT
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        w = (mask.cumsum(1) * mask).unsqueeze(-1).to(h.dtype)  # weights 1..n over real tokens
        _ = ((h.float() * w).sum(1) / w.sum(1)).cpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bloom-7b1", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--batch-sizes", default="8,32,64,128")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--write-ids", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    hidden, layers, heads = SHAPES[args.shape]
    cfg = BloomConfig(vocab_size=250880, hidden_size=hidden, n_layer=args.layers or layers, n_head=heads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        model = BloomModel(cfg).to(dtype).eval()
    seqs = corpus(args.texts)
    if args.write_ids:
        args.write_ids.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    tokens = sum(map(len, seqs))
    print(f"{args.shape} (L={cfg.n_layer}) {dtype} on {args.device}; {len(seqs)} texts, {tokens} tokens", flush=True)

    embed(model, seqs[:8], 8, args.device)  # warm-up
    results = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        try:
            sync(args.device)
            t = time.perf_counter()
            embed(model, seqs, b, args.device)
            sync(args.device)
            s = time.perf_counter() - t
            results.append({"batch": b, "seconds": s, "tokens_per_s": tokens / s, "texts_per_s": len(seqs) / s})
            print(f"  B={b:<4} {s:8.3f} s  {tokens / s:10.1f} tokens/s", flush=True)
        except torch.OutOfMemoryError:
            print(f"  B={b:<4} out of memory", flush=True)
            torch.cuda.empty_cache()
    query = [seqs[i] for i in range(len(seqs)) if len(seqs[i]) <= 16][0]
    lat = []
    for _ in range(20):
        sync(args.device)
        t = time.perf_counter()
        embed(model, [query], 1, args.device)
        sync(args.device)
        lat.append((time.perf_counter() - t) * 1e3)
    best = max(results, key=lambda r: r["tokens_per_s"])
    out = {"engine": f"transformers {__import__('transformers').__version__} + torch {torch.__version__}",
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": args.shape,
           "layers": cfg.n_layer, "dtype": str(dtype), "texts": len(seqs), "tokens": tokens, "per_batch": results,
           "best_batch": best["batch"], "tokens_per_s": best["tokens_per_s"], "query_tokens": len(query),
           "query_p50_ms": statistics.median(lat)}
    print(f"best B={best['batch']}: {best['tokens_per_s']:.1f} tokens/s; one {len(query)}-token query p50 {out['query_p50_ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
