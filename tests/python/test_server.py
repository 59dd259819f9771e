"""`sgpt serve` called by the real OpenAI Python client (pinned in tools/requirements.txt).

The server is the built binary (env SGPT_BIN, default target/debug/sgpt, which `cargo test`
builds; tools/test.sh runs that first), started on a free loopback port with an API key and
stopped with SIGTERM at the end (it must exit 0). Expected vectors come from `sgpt embed` on
the same texts.

Run from the repository root:  python3 -m pytest tests/python/test_server.py -q
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SGPT_BIN", ROOT / "target" / "debug" / "sgpt"))
MODEL = ROOT / "models" / "sgpt-tiny"
KEY = "test-key-123"
TIMEOUT = 60.0

TEXTS = [
    "What is the capital of France?",
    "  Ünïcödé — 東京 🙂",
    "lorem ipsum dolor sit amet " * 80,  # over the limit: cut to 297 tokens
]


def sgpt_embed(texts: list[str], *flags: str) -> np.ndarray:
    out = subprocess.run(
        [str(BIN), "embed", "--model", str(MODEL), "--quiet", "--device", "cpu", *flags, *texts],
        check=True, capture_output=True, text=True, timeout=TIMEOUT,
    ).stdout
    return np.array([json.loads(line)["embedding"] for line in out.splitlines()], dtype=np.float32)


@pytest.fixture(scope="module")
def server():
    if not BIN.exists():
        pytest.fail(f"{BIN} not found: run `cargo build` (tools/test.sh runs cargo test first) "
                    "or set SGPT_BIN")
    env = {k: v for k, v in os.environ.items() if k != "SGPT_API_KEY"}
    proc = subprocess.Popen(
        [str(BIN), "serve", "--model", str(MODEL), "--port", "0", "--api-key", KEY,
         "--threads", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    addr = None
    deadline = time.monotonic() + TIMEOUT
    while addr is None:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail("sgpt serve printed no address: " + "".join(log))
        if "listening on http://" in line:
            addr = line.split("listening on http://")[1].split()[0]
    base = f"http://{addr}"
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("sgpt serve never became healthy: " + "".join(log))
        time.sleep(0.05)
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0, "".join(log)
    assert "panicked" not in "".join(log)


@pytest.fixture(scope="module")
def client(server):
    # No retries: a 429 or 5xx must show up here, not be retried away.
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def test_string_input_equals_sgpt_embed(client):
    resp = client.embeddings.create(model="sgpt-tiny", input=TEXTS[0])
    assert resp.object == "list" and resp.model == "sgpt-tiny"
    got = vectors(resp)
    assert got.shape == (1, 64)
    np.testing.assert_array_equal(got, sgpt_embed(TEXTS[:1], "--normalize"))
    assert abs(float(np.linalg.norm(got[0].astype(np.float64))) - 1.0) < 1e-6


def test_list_input_in_order_with_usage(client):
    resp = client.embeddings.create(model="anything", input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(vectors(resp), sgpt_embed(TEXTS, "--normalize"))
    assert resp.model == "anything"
    # The long text is cut to 297 tokens + 2 brackets.
    assert resp.usage.prompt_tokens == resp.usage.total_tokens
    assert resp.usage.prompt_tokens > 299


def test_base64_and_float_agree(client):
    # The client asks for base64 unless told otherwise and decodes float32 little-endian.
    b64 = client.embeddings.create(model="m", input=TEXTS)
    flt = client.embeddings.create(model="m", input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(vectors(b64), vectors(flt))


def test_dimensions_cut_then_renormalize(client):
    raw = sgpt_embed(TEXTS).astype(np.float64)
    resp = client.embeddings.create(model="m", input=TEXTS, dimensions=16)
    got = vectors(resp)
    assert got.shape == (3, 16)
    want = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_input_type_document(client):
    resp = client.embeddings.create(model="m", input=TEXTS[:2], extra_body={"input_type": "document"})
    np.testing.assert_array_equal(vectors(resp), sgpt_embed(TEXTS[:2], "--normalize", "--kind", "document"))
    query = vectors(client.embeddings.create(model="m", input=TEXTS[:2]))
    assert not np.array_equal(vectors(resp), query), "documents and queries embed alike"


def test_errors_reach_the_client(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="m", input=[])
    assert e.value.status_code == 400 and e.value.code == "empty_input"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="m", input="   ")
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.embeddings.create(model="m", input="a", dimensions=1000)
    assert e.value.param == "dimensions" and "between 1 and 64" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.embeddings.create(model="m", input=[[1, 2, 3]])
    assert "token-id inputs are not supported" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model="m", input=["t"] * 33)
    assert e.value.status_code == 413 and e.value.code == "too_many_inputs"
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.embeddings.create(model="m", input="a")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    # and the server still answers
    assert len(client.embeddings.create(model="m", input="still up").data) == 1
