"""The `sgpt` Python package (python/, PyO3 + maturin) against the `sgpt` binary.

tools/test.sh installs the package into .venv (`pip install ./python`, when its sources or the
library's changed) and sets SGPT_REQUIRE_PACKAGE=1, so a missing package fails there; run by
hand without the package installed, this file is skipped. The binary is env SGPT_BIN (default
target/debug/sgpt, which `cargo test` builds).

Run from the repository root:  python3 -m pytest tests/python/test_package.py -q
"""

from __future__ import annotations

import enum
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("SGPT_REQUIRE_PACKAGE") == "1":
    import sgpt
else:
    sgpt = pytest.importorskip("sgpt", reason="the sgpt package is not installed: pip install ./python")

from sgpt_cli import embed_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SGPT_BIN", ROOT / "target" / "debug" / "sgpt"))
MODEL = ROOT / "models" / "sgpt-tiny"
TIMEOUT = 120.0

LONG = "lorem ipsum dolor sit amet " * 80  # over the limit: cut to 297 tokens
TEXTS = [
    "What is the capital of France?",
    "  Ünïcödé — 東京 🙂",
    "-a text that looks like a flag",
    LONG,
    "trailing whitespace is stripped \t\n",
]


def cli_embed(texts: list[str], tmp_path: Path, *flags: str) -> np.ndarray:
    if not BIN.exists():
        pytest.fail(f"{BIN} not found: run `cargo build` first (tools/test.sh does)")
    out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.npy"
    subprocess.run(
        [str(BIN), "embed", "--model", str(MODEL), "--quiet", "--device", "cpu",
         "-o", str(out), *flags, "--", *texts],
        check=True, capture_output=True, text=True, timeout=TIMEOUT,
    )
    return np.load(out)


@pytest.fixture(scope="module")
def model() -> "sgpt.Model":
    return sgpt.Model(MODEL, device="cpu")


# -- values: the CLI's, bit for bit ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["query", "document"])
@pytest.mark.parametrize("normalize", [False, True])
def test_encode_equals_cli_bit_for_bit(model, tmp_path, kind, normalize):
    flags = ["--kind", kind] + (["--normalize"] if normalize else [])
    want = cli_embed(TEXTS, tmp_path, *flags)
    got = model.encode(TEXTS, kind=kind, normalize=normalize)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    assert got.flags["C_CONTIGUOUS"]
    assert np.array_equal(got, want), np.abs(got - want).max()
    if normalize:
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_allow_empty_equals_cli(model, tmp_path):
    texts = ["a", "   ", ""]
    want = cli_embed(texts, tmp_path, "--allow-empty")
    assert np.array_equal(model.encode(texts, allow_empty=True), want)


def test_threads_and_batch_budget_do_not_change_vectors(model):
    want = model.encode(TEXTS * 3, kind="document")
    # The thread count splits the same products differently, never a sum: bit for bit.
    one_thread = sgpt.Model(MODEL, device="cpu", threads=1)
    assert np.array_equal(one_thread.encode(TEXTS * 3, kind="document"), want)
    assert one_thread.info["threads"] == 1
    # Another batch budget packs the texts into other batches; a batch of <= 48 tokens takes the
    # CPU's other product (docs/semantics.md, batch invariance): equal up to float rounding,
    # within the bound of the Rust batch-invariance tests (1e-6 + 1e-5 |x|).
    got = sgpt.Model(MODEL, device="cpu", max_batch_tokens=300).encode(TEXTS * 3, kind="document")
    worst = np.abs(got - want) - (1e-6 + 1e-5 * np.abs(want))
    assert worst.max() <= 0, f"worst element {np.unravel_index(worst.argmax(), worst.shape)}: {np.abs(got - want).max():e}"


def test_single_string_gives_one_vector_and_empty_list_none(model):
    one = model.encode(TEXTS[0])
    assert one.shape == (64,)
    assert np.array_equal(one, model.encode([TEXTS[0]])[0])
    assert model.encode([]).shape == (0, 64)
    # any iterable of str
    assert np.array_equal(model.encode(t for t in TEXTS[:2]), model.encode(TEXTS[:2]))
    assert np.array_equal(model.encode(tuple(TEXTS[:2])), model.encode(TEXTS[:2]))


def test_cargo_locks_agree_on_numeric_crates():
    """python/Cargo.lock is its own; the crates that compute must be the binary's versions."""
    def versions(lock: Path) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name, version in re.findall(r'name = "([^"]+)"\nversion = "([^"]+)"', lock.read_text()):
            out.setdefault(name, set()).add(version)
        return out

    root, py = versions(ROOT / "Cargo.lock"), versions(ROOT / "python" / "Cargo.lock")
    numeric = [n for n in root if re.match(r"(gemm|tokenizers|half|safetensors|cudarc|rayon|onig|pulp|memmap2)", n)]
    assert "gemm" in numeric and "tokenizers" in numeric
    differ = {n: (root[n], py.get(n)) for n in numeric if root[n] != py.get(n)}
    assert not differ, (
        f"python/Cargo.lock has other versions than Cargo.lock for {differ}: run "
        "`cargo update --manifest-path python/Cargo.toml -p NAME --precise VERSION`"
    )


# -- BEIR and MTEB interfaces ---------------------------------------------------------------------

CORPUS = [
    {"title": "Paris", "text": "Paris is the capital of France."},
    {"title": "", "text": "An untitled document."},
    {"text": "No title key at all."},
    {"title": "Long", "text": LONG},
]


def test_encode_corpus_joins_titles_as_the_cli(model, tmp_path):
    joined = ["Paris Paris is the capital of France.", "An untitled document.",
              "No title key at all.", "Long " + LONG]
    got = model.encode_corpus(CORPUS, batch_size=2)
    assert np.array_equal(got, model.encode(joined, kind="document"))
    # `sgpt embed` joins a JSONL "title" with the library's join_title
    lines = [dict(d, kind="document") for d in CORPUS]
    assert np.array_equal(got, embed_jsonl(lines, tmp_path, timeout=TIMEOUT))
    # BEIR's dict-of-lists form
    as_lists = {"title": [d.get("title", "") for d in CORPUS], "text": [d["text"] for d in CORPUS]}
    assert np.array_equal(model.encode_corpus(as_lists, batch_size=2), got)


def test_encode_queries_are_queries(model):
    qs = TEXTS[:3]
    got = model.encode_queries(qs, batch_size=16, show_progress_bar=False, convert_to_tensor=False)
    assert np.array_equal(got, model.encode(qs, kind="query"))
    assert not np.array_equal(got, model.encode(qs, kind="document"))


class PromptType(enum.Enum):  # as MTEB's
    query = "query"
    passage = "passage"
    document = "document"


def test_mteb_prompt_type_picks_the_brackets(model):
    s = TEXTS[:3]
    q = model.encode(s, task_name="NFCorpus", prompt_type=PromptType.query, batch_size=32)
    p = model.encode(s, task_name="NFCorpus", prompt_type=PromptType.passage, batch_size=32)
    assert np.array_equal(q, model.encode(s, kind="query"))
    assert np.array_equal(p, model.encode(s, kind="document"))
    assert np.array_equal(model.encode(s, prompt_type="document"), p)
    assert not np.allclose(q, p)
    # no prompt type (e.g. STS tasks): the kind's default, query
    assert np.array_equal(model.encode(s, task_name="STS12"), q)
    # MTEB 2 hands a DataLoader of {"text": [...]} batches
    batches = [{"text": s[:2]}, {"text": s[2:]}]
    assert np.array_equal(model.encode(batches, prompt_type=PromptType.document), p)
    with pytest.raises(ValueError, match="prompt_type"):
        model.encode(s, prompt_type="instruction")
    with pytest.raises(ValueError, match="contradicts"):
        model.encode(s, kind="query", prompt_type=PromptType.passage)


def test_show_progress_changes_nothing(model):
    assert np.array_equal(model.encode(TEXTS, show_progress=True), model.encode(TEXTS))
    assert np.array_equal(model.encode(TEXTS, show_progress_bar=True), model.encode(TEXTS))


def test_normalize_aliases(model):
    a = model.encode(TEXTS, normalize=True)
    assert np.array_equal(model.encode(TEXTS, normalize_embeddings=True), a)
    assert np.array_equal(model.encode_queries(TEXTS, batch_size=8, normalize_embeddings=True), a)


# -- description ----------------------------------------------------------------------------------

def test_description(model):
    assert model.hidden_size == 64 and model.get_sentence_embedding_dimension() == 64
    assert model.max_seq_length == 300
    info = model.info
    assert info["kind"] == "cpu" and info["dtype"] == "f32" and info["device"] == "cpu"
    assert info["threads"] >= 1 and info["kernels"] is None
    assert info["max_batch_tokens"] == 2048 and info["notice"] is None
    assert model.notice is None
    assert "cpu" in repr(model)
    assert isinstance(sgpt.__version__, str)


def test_auto_says_why_it_chose_the_cpu():
    m = sgpt.Model(MODEL)
    if m.info["kind"] == "cuda":
        pytest.skip("a GPU is usable here")
    assert m.notice and m.notice.startswith("using the CPU")


# -- errors: Python exceptions with the library's messages, never a crash -------------------------

def test_missing_model_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        sgpt.Model(tmp_path / "nope", device="cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in ("config.json", "modules.json", "sentence_bert_config.json", "model.safetensors"):
        (partial / f).write_bytes((MODEL / f).read_bytes())
    (partial / "1_Pooling").mkdir()
    for f in (MODEL / "1_Pooling").iterdir():
        (partial / "1_Pooling" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        sgpt.Model(partial, device="cpu")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        sgpt.Model(MODEL / "config.json", device="cpu")


def test_bad_model_files_are_value_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in MODEL.rglob("*"):
        dest = bad / f.relative_to(MODEL)
        if f.is_dir():
            dest.mkdir()
        else:
            dest.write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        sgpt.Model(bad, device="cpu")


def test_bad_input_is_value_error(model):
    with pytest.raises(ValueError, match=r"2 empty or whitespace-only text\(s\) at index 1, 3 \(0-based\)"):
        model.encode(["fine", "", "fine", " \t\n"])
    with pytest.raises(ValueError, match='unknown kind "passage"'):
        model.encode(["x"], kind="passage")
    with pytest.raises(TypeError, match="index 1"):
        model.encode(["x", 3])
    with pytest.raises(ValueError, match="corpus item 0 has no 'text'"):
        model.encode_corpus([{"title": "t"}])


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="CPU backend always computes in f32"):
        sgpt.Model(MODEL, device="cpu", dtype="f16")
    with pytest.raises(ValueError, match="unknown dtype"):
        sgpt.Model(MODEL, device="auto", dtype="f32")
    with pytest.raises(ValueError, match="unknown device"):
        sgpt.Model(MODEL, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        sgpt.Model(MODEL, device="cpu", threads=0)
    with pytest.raises(ValueError, match="threads.* must be between 1 and"):
        sgpt.Model(MODEL, device="cpu", threads=100_000)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        sgpt.Model(MODEL, device="cpu", max_batch_tokens=0)
    # The GPU kernel choices: typed, refused on the CPU, an unknown value named.
    with pytest.raises(ValueError, match="GPU kernel choices"):
        sgpt.Model(MODEL, device="cpu", attention="mma")
    with pytest.raises(ValueError, match="GPU kernel choices"):
        sgpt.Model(MODEL, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="unknown attention kernel 'v9'|unknown attention kernel \"v9\""):
        sgpt.Model(MODEL, device="cpu", attention="v9")
    with pytest.raises(ValueError, match="expected one of cublaslt, skinny"):
        sgpt.Model(MODEL, device="cpu", gemm="cutlass")
    with pytest.raises(ValueError, match="GPU kernel choices"):
        sgpt.Model(MODEL, device="cpu", row_kernels="vec")
    with pytest.raises(ValueError, match="unknown row kernel .wide.: expected one of v1, vec"):
        sgpt.Model(MODEL, device="cpu", row_kernels="wide")
    with pytest.raises(ValueError, match="GPU kernel choices"):
        sgpt.Model(MODEL, device="cpu", embedding_table="host")
    with pytest.raises(ValueError, match="unknown embedding table placement .disk.: expected one of device, host"):
        sgpt.Model(MODEL, device="cpu", embedding_table="disk")


def test_unusable_gpu_is_runtime_error():
    with pytest.raises(RuntimeError, match="cuda:99"):
        sgpt.Model(MODEL, device="cuda:99")
    if sgpt.Model(MODEL).info["kind"] == "cpu":  # no usable GPU here
        with pytest.raises(RuntimeError, match="^--device cuda:0: "):
            sgpt.Model(MODEL, device="cuda")


def test_errors_never_kill_the_interpreter(tmp_path):
    """Every error in a fresh interpreter, which must then go on and exit 0."""
    code = f"""
import sgpt
errors = []
def expect(exc, f):
    try:
        f()
    except exc as e:
        errors.append(type(e).__name__)
    else:
        raise SystemExit("no error")
m = sgpt.Model({str(MODEL)!r}, device="cpu")
expect(FileNotFoundError, lambda: sgpt.Model("/nonexistent/model"))
expect(ValueError, lambda: m.encode([""]))
expect(ValueError, lambda: m.encode(["x"], kind="nope"))
expect(ValueError, lambda: sgpt.Model({str(MODEL)!r}, device="cpu", dtype="bf16"))
expect(RuntimeError, lambda: sgpt.Model({str(MODEL)!r}, device="cuda:99"))
print(m.encode("still alive").shape, len(errors))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(64,) 5"


def test_ctrl_c_stops_a_long_encode():
    """SIGINT during a long call raises KeyboardInterrupt soon, and the model still works."""
    code = f"""
import os, signal, threading, time, sgpt
m = sgpt.Model({str(MODEL)!r}, device="cpu")
texts = [f"{{i}} " + "lorem ipsum dolor sit amet " * 80 for i in range(2000)]
t = time.perf_counter()
m.encode(texts[:200])
full = (time.perf_counter() - t) * 10
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
t = time.perf_counter()
try:
    m.encode(texts)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", time.perf_counter() - t, full)
print(m.encode("still works").shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].startswith("interrupted"), r.stdout
    took, full = map(float, lines[0].split()[1:])
    assert took < full / 2, (took, full)
    assert lines[1] == "(64,)"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_fork_after_use_is_an_error_not_a_hang():
    """rayon's threads do not survive fork(): the child gets a RuntimeError, the parent goes on."""
    code = f"""
import os, signal, sgpt
m = sgpt.Model({str(MODEL)!r}, device="cpu")
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hang would end here, with status 14
    for f in (lambda: m.encode(["x"]), lambda: sgpt.Model({str(MODEL)!r}, device="cpu")):
        try:
            f()
            os._exit(3)
        except RuntimeError as e:
            assert "fork" in str(e), e
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), m.encode("parent").shape)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0 (64,)", r.stdout + r.stderr


# -- the GIL is released while embedding -----------------------------------------------------------

def test_concurrent_threads_and_gil_released(model):
    # Enough work for a measurable call on this machine.
    texts = [f"{i} {LONG}" for i in range(64)]
    while True:
        t0 = time.perf_counter()
        want = model.encode(texts, kind="document")
        took = time.perf_counter() - t0
        if took >= 0.3 or len(texts) >= 16384:
            break
        texts = texts * 2
    want = model.encode(texts, kind="document")

    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = model.encode(texts, kind="document")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    tick = threading.Thread(target=ticker)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    tick.start()
    time.sleep(0.02)
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=TIMEOUT)
    end = time.perf_counter()
    stop.set()
    tick.join()

    assert not errors, errors
    assert all(not w.is_alive() for w in workers)
    assert np.array_equal(results[0], want) and np.array_equal(results[1], want)
    # The ticker ran all along: no pause as long as an encode call (the GIL was not held).
    during = [t for t in ticks if start <= t <= end]
    gaps = np.diff([start, *during, end])
    assert len(during) >= 5 and gaps.max() < max(took / 2, 0.1), (took, end - start, gaps.max())


def test_convert_to_tensor_as_beir_asks():
    """BEIR's exact search passes convert_to_tensor=True (its default) and scores with torch."""
    torch = pytest.importorskip("torch")
    m = sgpt.Model(MODEL, device="cpu")
    q = m.encode_queries(TEXTS[:2], batch_size=16, show_progress_bar=False, convert_to_tensor=True)
    d = m.encode_corpus(CORPUS, batch_size=16, show_progress_bar=False, convert_to_tensor=True)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32 and tuple(d.shape) == (4, 64)
    assert np.array_equal(q.numpy(), m.encode(TEXTS[:2], kind="query"))


def test_readme_example_runs():
    """python/README.md's example, run as written from the repository root."""
    readme = (ROOT / "python" / "README.md").read_text(encoding="utf-8")
    example = re.search(r"## Example\n\n```python\n(.*?)```", readme, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "'kind'" in r.stdout


def test_stubs_name_what_the_native_module_has():
    """sgpt/_sgpt.pyi (what editors complete) against the compiled module."""
    import ast

    from sgpt import _sgpt

    stub = ast.parse((Path(sgpt.__file__).parent / "_sgpt.pyi").read_text(encoding="utf-8"))
    (engine,) = [n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Engine"]
    stubbed = {n.name for n in engine.body if isinstance(n, ast.FunctionDef)} - {"__new__"}
    native = {n for n in dir(_sgpt.Engine) if not n.startswith("_")}
    assert stubbed == native
    assert (Path(sgpt.__file__).parent / "py.typed").exists()


@pytest.mark.parametrize("dtype", ["fp8", "fp8-alternate"])
def test_fp8_emulation_is_a_dtype_on_the_cpu(dtype):
    """dtype="fp8" (or "fp8-alternate") on the CPU is the FP8 emulation: the same vectors as
    `sgpt embed --dtype fp8` (or fp8-alternate)."""
    model = sgpt.Model(MODEL, device="cpu", dtype=dtype)
    assert model.info["dtype"] == dtype, model.info
    got = model.encode(TEXTS[:3], kind="query")
    out = subprocess.run(
        [str(BIN), "embed", "-m", str(MODEL), "--device", "cpu", "--dtype", dtype, "--quiet", "--", *TEXTS[:3]],
        capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )
    want = np.array([json.loads(line)["embedding"] for line in out.stdout.splitlines()], dtype=np.float32)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match='unknown dtype "f8": expected one of f16, bf16, fp8, fp8-alternate'):
        sgpt.Model(MODEL, device="cpu", dtype="f8")
