#!/usr/bin/env python3
"""Load benchmark of `sgpt serve`: bounded concurrent clients on loopback, throughput and latency.

Starts `sgpt serve` on a free loopback port (or targets --url), then for each concurrency level
runs that many clients, each on its own keep-alive connection, sending one-query requests
back to back (a different synthetic query every time) for --duration seconds or --max-requests
requests, whichever comes first. Reports requests/s, texts/s, tokens/s, latency p50/p90/p99/max,
the mean batch the server packed (from its /metrics), and how much CPU the load generator and
other processes took: on a small machine the client competes with the server for the cores.

    python3 tools/load_bench.py --model models/sgpt-tiny                       # quick look
    python3 tools/load_bench.py --model /tmp/sgpt-bench/bloom-560m --concurrency 1,4,16 \\
        --duration 20 --record docs/bench                                      # a record
    python3 tools/load_bench.py --model models/sgpt-tiny --concurrency 1 --engine-baseline

With --engine-baseline the same run also measures what the server adds to the engine: one
client on a plain blocking socket (so the client's own cost is small) for --duration seconds,
the HTTP round trip of `GET /health` (transport and client, no engine), the mean time of each
stage of a request from the server's `sgpt_request_stage_seconds`, and then, the server
stopped, `sgpt bench` on the same model and threads for the engine's own single-query p50 at
the server's measured tokens per query; it reports the difference and the target (engine
p50 + 0.3 ms, issue 18).

Only loopback is used; every loop is bounded by time and count. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("what how why when where which who capital river mountain population history "
         "protein vaccine climate energy battery solar neural network language model search "
         "retrieval embedding query document ocean city country river law court price market "
         "bank loan tax health sleep heart brain cell gene virus planet star galaxy orbit").split()


def queries(seed: int):
    """Endless distinct short queries, 6-12 words, deterministic."""
    rng = random.Random(seed)
    n = 0
    while True:
        n += 1
        yield f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))} {n}?"


def clock() -> float:
    return time.perf_counter()


def proc_cpu(pid: int | str) -> float | None:
    """utime + stime of a process in seconds (Linux /proc)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_busy() -> float | None:
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuShares:
    """CPU used during an interval by this script, the server, and everything else."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.t = clock()
        self.own, self.srv, self.all = proc_cpu("self"), self._srv(), machine_busy()

    def _srv(self):
        return proc_cpu(self.pid) if self.pid else None

    def shares(self) -> dict:
        wall, cores = clock() - self.t, os.cpu_count() or 1
        own, srv, busy = proc_cpu("self"), self._srv(), machine_busy()
        out = {"client_cores": None, "server_cores": None, "other_share": None}
        if own is not None and self.own is not None:
            out["client_cores"] = (own - self.own) / wall
        if srv is not None and self.srv is not None:
            out["server_cores"] = (srv - self.srv) / wall
        if None not in (busy, self.all, own, self.own, srv, self.srv):
            other = (busy - self.all) - (own - self.own) - (srv - self.srv)
            out["other_share"] = max(0.0, other / (wall * cores))
        return out


async def http(reader, writer, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)
                   if k.strip().lower() == "content-length"), None)
    if length is None:
        raise RuntimeError("response without Content-Length")
    return status, await reader.readexactly(length)


async def client(url, route, texts_per_req, gen, stop_at, budget, lat, errors):
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        while clock() < stop_at and budget[0] > 0:
            budget[0] -= 1
            texts = [next(gen) for _ in range(texts_per_req)]
            body = {"inputs": texts} if route == "/embed" else {"input": texts, "model": "bench"}
            t0 = clock()
            status, data = await http(reader, writer, u.netloc, route, json.dumps(body).encode())
            dt = clock() - t0
            if status == 200:
                lat.append(dt)
            else:
                errors[status] = errors.get(status, 0) + 1
                if status not in (429,):
                    print(f"  HTTP {status}: {data[:200]!r}", file=sys.stderr)
    finally:
        writer.close()


def scrape(url: str) -> dict[str, float]:
    import urllib.request
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


def get_json(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


STAGES = ("read", "parse", "tokenize", "queue", "engine", "respond")


def stage_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean milliseconds of each `sgpt_request_stage_seconds` stage between two scrapes."""
    out = {}
    for st in STAGES:
        key = f'{{stage="{st}"}}'
        n = after.get(f"sgpt_request_stage_seconds_count{key}", 0.0) - before.get(
            f"sgpt_request_stage_seconds_count{key}", 0.0)
        s = after.get(f"sgpt_request_stage_seconds_sum{key}", 0.0) - before.get(
            f"sgpt_request_stage_seconds_sum{key}", 0.0)
        out[st] = 1e3 * s / n if n > 0 else None
    return out


def blocking_client(url: str, path: str, texts: int, seed: int, duration: float,
                    max_requests: int) -> list[float]:
    """One keep-alive connection on a blocking socket, one request at a time: the leanest
    Python client (asyncio's own cost is a few tenths of a millisecond per request). POST
    `path` with new queries, or GET it when `texts` is 0. Returns the latencies (s) of 200s."""
    import socket
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    gen, lat = queries(seed), []
    stop_at = clock() + duration
    try:
        while clock() < stop_at and len(lat) < max_requests:
            if texts:
                key = "inputs" if path == "/embed" else "input"
                body = json.dumps({key: [next(gen) for _ in range(texts)]}).encode()
                req = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: "
                       f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            else:
                req = f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()
            t0 = clock()
            s.sendall(req)
            status = int(f.readline().split()[1])
            length = None
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if length is None:
                raise RuntimeError("response without Content-Length")
            data = f.read(length)
            dt = clock() - t0
            if status != 200:
                raise RuntimeError(f"HTTP {status} from {path}: {data[:200]!r}")
            lat.append(dt)
    finally:
        f.close()
        s.close()
    return lat


def server_overhead(url: str, route: str, texts: int, duration: float, max_requests: int,
                    seed: int) -> dict:
    """The server's side of --engine-baseline: one blocking client, then GET /health."""
    before = scrape(url)
    lat = blocking_client(url, route, texts, seed, duration, max_requests)
    after = scrape(url)
    health = blocking_client(url, "/health", 0, 0, min(duration, 3.0), 3000)
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    n_req = d(f'sgpt_request_duration_seconds_count{{route="{route}"}}')
    return {
        "requests_ok": len(lat),
        "server_p50_ms": 1e3 * pct(lat, 0.5),
        "server_p99_ms": 1e3 * pct(lat, 0.99),
        "health_p50_ms": 1e3 * pct(health, 0.5),
        "tokens_per_query": d("sgpt_tokens_total") / max(1.0, d("sgpt_texts_total")),
        "request_duration_mean_ms": (1e3 * d(f'sgpt_request_duration_seconds_sum{{route="{route}"}}')
                                     / n_req if n_req else None),
        "stage_means_ms": stage_means_ms(before, after),
    }


def engine_baseline(args, tokens: int, reps: int) -> dict:
    """`sgpt bench` on the server's model and threads: the engine's single-query latency for a
    query of `tokens` tokens, `reps` times (its --json output)."""
    cmd = [str(args.sgpt), "bench", "--model", str(args.model), "--texts", "16",
           "--latency-batches", "1", "--query-tokens", str(tokens), "--latency-reps", str(reps),
           "--quiet", "--json", "-"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    b = json.loads(out.stdout)
    q = b["latency"]["batch_01"]
    return {"command": " ".join(cmd[1:]), "engine_p50_ms": q["p50_ms"],
            "engine_p99_ms": q["p99_ms"], "tokens": q["tokens"], "reps": reps,
            "backend": b["backend"]}


TARGET_MS = 0.3  # issue 18: the server's p50 at most the engine's + 0.3 ms


def compare(srv: dict, eng: dict) -> dict:
    diff = srv["server_p50_ms"] - eng["engine_p50_ms"]
    return {"difference_ms": diff, "target_ms": eng["engine_p50_ms"] + TARGET_MS,
            # to the microsecond, the precision reported (and no float noise at the boundary)
            "met": round(diff, 3) <= TARGET_MS}


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


async def run_level(url, route, conc, texts_per_req, duration, max_requests, seed, server_pid):
    lat: list[float] = []
    errors: dict[int, int] = {}
    before = scrape(url)
    cpu = CpuShares(server_pid)
    t0 = clock()
    budget = [max_requests]
    await asyncio.gather(*(client(url, route, texts_per_req, queries(seed * 1000 + c),
                                  t0 + duration, budget, lat, errors) for c in range(conc)))
    wall = clock() - t0
    shares = cpu.shares()
    after = scrape(url)
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    batches = d("sgpt_batch_sequences_count")
    return {
        "concurrency": conc, "requests_ok": len(lat), "errors": errors, "seconds": wall,
        "requests_per_s": len(lat) / wall, "texts_per_s": d("sgpt_texts_total") / wall,
        "tokens_per_s": d("sgpt_tokens_total") / wall,
        "latency_ms": {k: (None if pct(lat, p) is None else 1e3 * pct(lat, p))
                       for k, p in (("p50", .5), ("p90", .9), ("p99", .99), ("max", 1.0))},
        "mean_batch_texts": d("sgpt_batch_sequences_sum") / batches if batches else None,
        "mean_batch_tokens": d("sgpt_batch_tokens_sum") / batches if batches else None,
        "engine_busy_share": d("sgpt_batch_duration_seconds_sum") / wall,
        **shares,
    }


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [str(args.sgpt), "serve", "--model", str(args.model), "--port", "0",
           "--max-concurrent-requests", str(max(512, 2 * max(args.levels)))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    env = {k: v for k, v in os.environ.items() if k != "SGPT_API_KEY"}
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    for line in p.stderr:
        if "listening on http://" in line:
            url = "http://" + line.split("listening on http://")[1].split()[0]
            break
        if time.monotonic() > deadline:
            break
    else:
        raise SystemExit(f"sgpt serve exited: {p.wait()}")
    # keep draining stderr so the server never blocks on a full pipe
    import threading
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    while True:
        try:
            get_json(f"{url}/info")
            return p, url
        except OSError:
            if time.monotonic() > deadline + 600 or p.poll() is not None:
                p.kill()
                raise SystemExit("sgpt serve never became ready")
            time.sleep(0.2)


def wait_quiet(limit_s: float) -> float | None:
    """Waits (at most limit_s) for 2 s in which other processes use under 10% of the CPU."""
    deadline = time.monotonic() + limit_s
    while True:
        c = CpuShares(None)
        time.sleep(2.0)
        wall, busy, own = clock() - c.t, machine_busy(), proc_cpu("self")
        if None in (busy, c.all, own, c.own):
            return None
        other = max(0.0, ((busy - c.all) - (own - c.own)) / (wall * (os.cpu_count() or 1)))
        if other < 0.10 or time.monotonic() > deadline:
            return other
        print(f"waiting for a quiet machine: other processes use {100 * other:.0f}% of the CPU",
              file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def f(x, nd=1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown(r: dict) -> str:
    info, env = r["server"], r["environment"]
    q = env["other_load_before"]
    before = "not measured" if q is None else f"{100 * q:.0f}%"
    out = [f"# `sgpt serve` load benchmark: {r['shape']} on {info['backend']}", "",
           f"Generated by `tools/load_bench.py` on {env['date']} (every number below was measured "
           "in this run).", "", f"Command: `{r['command']}`", "", "## Environment", "",
           "| | |", "|---|---|",
           f"| CPU | {env['cpu']} |", f"| cores | {env['cores']} |",
           f"| load average at start / end | {env['loadavg_start']} / {env['loadavg_end']} |",
           f"| CPU used by other processes before start | {before} |",
           f"| sgpt commit | {env['commit']} |",
           f"| server | {info['backend']}, `--max-batch-tokens {info['max_batch_tokens']}` |",
           f"| model | `{info['model_dir']}`: hidden {info['dimensions']}, {info['layers']} layers, "
           f"{info['heads']} heads, {info['weights_dtype']} |",
           f"| requests | `POST {r['route']}`, {r['texts_per_request']} short query per request "
           f"(6-12 words; {f(r['mean_tokens_per_text'])} tokens per text with brackets, measured), "
           "a new text every time |",
           f"| clients | Python asyncio on the same machine, one keep-alive connection each; "
           f"each level runs {r['duration']} s or {r['max_requests']} requests |", "",
           "## Results", "",
           "| clients | requests | req/s | texts/s | tokens/s | p50 ms | p90 ms | p99 ms | max ms "
           "| mean batch (texts) | engine busy | client CPU (cores) | server CPU (cores) | other load | errors |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lv in r["levels"]:
        la = lv["latency_ms"]
        other = "n/a" if lv["other_share"] is None else f"{100 * lv['other_share']:.0f}%"
        out.append(
            f"| {lv['concurrency']} | {lv['requests_ok']} | {f(lv['requests_per_s'])} | "
            f"{f(lv['texts_per_s'])} | {f(lv['tokens_per_s'])} | {f(la['p50'], 2)} | "
            f"{f(la['p90'], 2)} | {f(la['p99'], 2)} | {f(la['max'], 2)} | "
            f"{f(lv['mean_batch_texts'], 2)} | {f(100 * lv['engine_busy_share'], 0)}% | "
            f"{f(lv['client_cores'], 2)} | {f(lv['server_cores'], 2)} | "
            f"{other} | "
            f"{lv['errors'] or 'none'} |")
    out += ["", "Latency is measured by the client: from writing the request to reading the whole "
            "response, on loopback. \"engine busy\" is the share of the wall time the engine worker "
            "spent in `Backend::embed` (from `sgpt_batch_duration_seconds`); \"other load\" is the "
            "share of the machine's CPU taken by processes other than the server and this script.",
            ""]
    if r.get("overhead"):
        out += overhead_markdown(r["overhead"])
    return "\n".join(out)


def overhead_markdown(o: dict) -> list[str]:
    s, e, c = o["server"], o["engine"], o["comparison"]
    out = ["## What the server adds to the engine (`--engine-baseline`)", "",
           f"One client on a blocking keep-alive socket, one new query per request, "
           f"{s['requests_ok']} requests; then, the server stopped, `sgpt {e['command']}` "
           f"({e['backend']}).", "",
           "| | ms |", "|---|---:|",
           f"| server p50, one client ({f(s['tokens_per_query'])} tokens per query) | "
           f"{f(s['server_p50_ms'], 3)} |",
           f"| engine p50, `sgpt bench`, one query of {e['tokens']} tokens, {e['reps']} reps | "
           f"{f(e['engine_p50_ms'], 3)} |",
           f"| difference | {f(c['difference_ms'], 3)} |",
           f"| target: engine p50 + {TARGET_MS} ms | {f(c['target_ms'], 3)} "
           f"({'met' if c['met'] else 'missed'}) |",
           f"| server p99 / engine p99 | {f(s['server_p99_ms'], 3)} / {f(e['engine_p99_ms'], 3)} |",
           f"| `GET /health` round trip p50 (HTTP and client, no engine) | "
           f"{f(s['health_p50_ms'], 3)} |",
           f"| server's own request time, mean (`sgpt_request_duration_seconds`) | "
           f"{f(s['request_duration_mean_ms'], 3)} |", "",
           "Mean time of each stage of those requests (`sgpt_request_stage_seconds`; docs/serve.md):",
           "", "| " + " | ".join(STAGES) + " |", "|" + "---:|" * len(STAGES),
           "| " + " | ".join(f(s["stage_means_ms"][st], 3) for st in STAGES) + " |", ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="start `sgpt serve` on this model directory")
    src.add_argument("--url", help="benchmark a running server instead, e.g. http://127.0.0.1:8080")
    ap.add_argument("--sgpt", type=Path, default=ROOT / "target" / "release" / "sgpt")
    ap.add_argument("--threads", type=int, help="--threads for the server")
    ap.add_argument("--max-batch-tokens", type=int, help="--max-batch-tokens for the server")
    ap.add_argument("--concurrency", default="1,4,16,64", help="client counts (default 1,4,16,64)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    ap.add_argument("--max-requests", type=int, default=20000, help="requests per level at most")
    ap.add_argument("--texts-per-request", type=int, default=1)
    ap.add_argument("--route", choices=["/embed", "/v1/embeddings"], default="/embed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="first wait up to SECONDS for other processes to leave the CPU idle")
    ap.add_argument("--record", type=Path, metavar="DIR",
                    help="write serve-<backend>-<shape>-<date>.{md,json} into DIR")
    ap.add_argument("--engine-baseline", action="store_true",
                    help="also measure one blocking client, GET /health and the stages, then "
                         "`sgpt bench` on the same model for the engine's single-query p50")
    args = ap.parse_args()
    if args.engine_baseline and not args.model:
        ap.error("--engine-baseline needs --model (it runs `sgpt bench` on it)")
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in args.levels) or args.duration <= 0 or args.max_requests < 1:
        ap.error("levels, --duration and --max-requests must be positive")

    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    try:
        info = get_json(f"{url}/info")
        env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
               "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
               "commit": git_commit(),
               "other_load_before": quiet}
        # warm-up, not reported: a few requests through every code path
        asyncio.run(run_level(url, args.route, 2, args.texts_per_request, 2.0, 20, 999, None))
        levels = []
        for c in args.levels:
            lv = asyncio.run(run_level(url, args.route, c, args.texts_per_request, args.duration,
                                       args.max_requests, args.seed + c,
                                       proc.pid if proc else None))
            la = lv["latency_ms"]
            print(f"clients {c:4d}: {lv['requests_ok']:6d} ok, {lv['requests_per_s']:8.1f} req/s, "
                  f"p50 {f(la['p50'], 2)} ms, p99 {f(la['p99'], 2)} ms, mean batch "
                  f"{f(lv['mean_batch_texts'], 2)}, errors {lv['errors'] or 'none'}", flush=True)
            levels.append(lv)
        srv = None
        if args.engine_baseline:
            srv = server_overhead(url, args.route, args.texts_per_request, args.duration,
                                  args.max_requests, args.seed + 7)
            print(f"one blocking client: p50 {f(srv['server_p50_ms'], 3)} ms, GET /health p50 "
                  f"{f(srv['health_p50_ms'], 3)} ms, stages (mean ms) "
                  + ", ".join(f"{k} {f(v, 3)}" for k, v in srv["stage_means_ms"].items()),
                  flush=True)
        env["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed"
            if code != 0:
                print(f"sgpt serve exited with {code}", file=sys.stderr)
    overhead = None
    if srv:
        # As many repetitions as the server's phase had requests, within 200..20000.
        reps = max(200, min(20000, srv["requests_ok"]))
        eng = engine_baseline(args, max(3, round(srv["tokens_per_query"])), reps)
        overhead = {"server": srv, "engine": eng, "comparison": compare(srv, eng)}
        c = overhead["comparison"]
        print(f"engine p50 {f(eng['engine_p50_ms'], 3)} ms ({eng['tokens']} tokens): the server "
              f"adds {f(c['difference_ms'], 3)} ms (target <= {TARGET_MS}: "
              f"{'met' if c['met'] else 'missed'})", flush=True)
    shape = Path(info["model_dir"]).name
    report = {"shape": shape, "server": info, "environment": env, "route": args.route,
              "texts_per_request": args.texts_per_request, "duration": args.duration,
              "max_requests": args.max_requests, "levels": levels,
              "mean_tokens_per_text": (sum(lv["tokens_per_s"] * lv["seconds"] for lv in levels)
                                       / max(1e-9, sum(lv["texts_per_s"] * lv["seconds"]
                                                       for lv in levels))),
              "overhead": overhead,
              "command": "python3 tools/load_bench.py " + " ".join(sys.argv[1:])}
    if args.record:
        device = info["backend"].split()[0]
        name = f"serve-{device}-{shape}-{datetime.now(timezone.utc):%Y-%m-%d}"
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.record / f"{name}.md").write_text(markdown(report))
        print(f"wrote {args.record / name}.md and .json")
    else:
        print(markdown(report))


if __name__ == "__main__":
    main()
