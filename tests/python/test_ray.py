"""sgpt.ray.Embed and tools/ray_embed.py on a local Ray with CPU actors, against `sgpt embed`.

Needs the sgpt package and Ray Data (tools/requirements.txt; tools/test.sh installs both into
.venv and sets SGPT_REQUIRE_PACKAGE=1, so a missing one fails there); run by hand without them,
this file is skipped. The binary is env SGPT_BIN (default target/debug/sgpt).

Run from the repository root:  python3 -m pytest tests/python/test_ray.py -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("SGPT_REQUIRE_PACKAGE") == "1":
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data

    import sgpt
    import sgpt.ray
else:
    sgpt = pytest.importorskip("sgpt", reason="the sgpt package is not installed: pip install ./python")
    ray = pytest.importorskip("ray", reason='Ray Data is not installed: pip install "ray[data]"')
    pa = pytest.importorskip("pyarrow", reason='Ray Data is not installed: pip install "ray[data]"')
    import pyarrow.parquet as pq
    import ray.data

    import sgpt.ray

from sgpt_cli import embed_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SGPT_BIN", ROOT / "target" / "debug" / "sgpt"))
MODEL = ROOT / "models" / "sgpt-tiny"
SCRIPT = ROOT / "tools" / "ray_embed.py"
TIMEOUT = 300.0

LONG = "lorem ipsum dolor sit amet " * 80  # over the limit: cut to 297 tokens
DOCS = [
    {"id": "d0", "title": "Paris", "text": "Paris is the capital of France."},
    {"id": "d1", "title": "", "text": "An untitled document."},
    {"id": "d2", "title": None, "text": "  Ünïcödé — 東京 🙂"},
    {"id": "d3", "title": "Long", "text": LONG},
    {"id": "d4", "title": "Flags", "text": "-a text that looks like a flag"},
    {"id": "d5", "title": "Whitespace", "text": "trailing whitespace is stripped \t\n"},
] + [{"id": f"d{i}", "title": f"T{i % 3}", "text": f"document number {i} " + "word " * (i % 17)}
     for i in range(6, 40)]


def cli_embed_jsonl(rows: list[dict], tmp_path: Path, *flags: str) -> np.ndarray:
    """`sgpt embed` on the rows as JSONL ({"text", "title"} per line): its .npy."""
    lines = [{"text": r["text"], **({"title": r["title"]} if r.get("title") else {})} for r in rows]
    return embed_jsonl(lines, tmp_path, *flags, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def model() -> "sgpt.Model":
    return sgpt.Model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def want(model, tmp_path_factory) -> np.ndarray:
    """DOCS as `sgpt embed --kind document` embeds them, checked against encode_corpus."""
    vectors = cli_embed_jsonl(DOCS, tmp_path_factory.mktemp("cli"), "--kind", "document")
    assert np.array_equal(model.encode_corpus(DOCS), vectors)
    return vectors


def embed_kwargs(**kw) -> dict:
    return {"model": str(MODEL), "kind": "document", "device": "cpu", "title_column": "title",
            "id_column": "id", **kw}


# -- the module, called directly (no Ray runtime) ---------------------------------------------------

def test_package_imports_without_ray_and_sgpt_ray_says_what_to_install():
    code = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed
import sgpt
print(sgpt.Model({str(MODEL)!r}, device="cpu").encode("x").shape)
try:
    import sgpt.ray
except ImportError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    shape, message = r.stdout.strip().split("\n")
    assert shape == "(64,)"
    assert 'pip install "ray[data]"' in message and "ray is not installed" in message


@pytest.fixture(scope="module")
def embed() -> "sgpt.ray.Embed":
    return sgpt.ray.Embed(**embed_kwargs())


def table(rows: list[dict]) -> "pa.Table":
    return pa.table({
        "id": [r["id"] for r in rows],
        "title": pa.array([r["title"] for r in rows], pa.string()),
        "text": [r["text"] for r in rows],
        "extra": list(range(len(rows))),
    })


def test_every_batch_format_gives_the_cli_vectors_and_keeps_the_other_columns(embed, want):
    t = table(DOCS)
    out = embed(t)  # pyarrow
    assert out.column_names == ["id", "title", "text", "extra", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert out.select(["id", "title", "text", "extra"]).equals(t)
    assert np.array_equal(np.array(out.column("embedding").to_pylist(), np.float32), want)

    df = embed(t.to_pandas())  # pandas: one 1-D float32 array per row
    assert list(df.columns) == ["id", "title", "text", "extra", "embedding"]
    assert df["id"].tolist() == [r["id"] for r in DOCS] and df["extra"].tolist() == list(range(len(DOCS)))
    assert df["embedding"].iloc[0].dtype == np.float32
    assert np.array_equal(np.stack(df["embedding"].tolist()), want)

    batch = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}  # numpy
    out_np = embed(batch)
    assert set(out_np) == {"id", "title", "text", "extra", "embedding"}
    assert out_np["embedding"].dtype == np.float32 and np.array_equal(out_np["embedding"], want)
    assert out_np["id"] is batch["id"]


def test_titles_are_joined_as_encode_corpus_and_only_when_asked(model):
    rows = DOCS[:3]
    with_titles = sgpt.ray.Embed(**embed_kwargs())(table(rows)).column("embedding").to_pylist()
    assert np.array_equal(np.array(with_titles, np.float32),
                          model.encode(["Paris Paris is the capital of France.", "An untitled document.",
                                        "  Ünïcödé — 東京 🙂"], kind="document"))
    plain = sgpt.ray.Embed(**embed_kwargs(title_column=None))(table(rows)).column("embedding")
    assert np.array_equal(np.array(plain.to_pylist(), np.float32),
                          model.encode([r["text"] for r in rows], kind="document"))
    # pandas writes a missing title as NaN: no title, as None
    df = table(rows).to_pandas()
    assert df["title"].isna().tolist() == [False, False, True]
    got = sgpt.ray.Embed(**embed_kwargs())(df)["embedding"].tolist()
    assert np.array_equal(np.stack(got), np.array(with_titles, np.float32))


def test_kind_query_and_normalize(model):
    texts = [r["text"] for r in DOCS[:4]]
    e = sgpt.ray.Embed(str(MODEL), kind="query", device="cpu", normalize=True)
    got = e({"text": np.array(texts, dtype=object)})["embedding"]
    assert np.array_equal(got, model.encode(texts, kind="query", normalize=True))


def test_bad_rows_are_named_by_id(embed):
    rows = [dict(r) for r in DOCS[:5]]
    rows[1]["text"], rows[3]["text"] = "", " \t"
    rows[3]["title"] = None  # with a title, the joined text "Long  \t" is not empty
    with pytest.raises(ValueError, match=r"2 empty or whitespace-only text\(s\) in column 'text': id 'd1', 'd3'; pass allow_empty=True"):
        embed(table(rows))
    rows[3]["text"] = None
    with pytest.raises(ValueError, match=r"1 row\(s\) have no text \(null in column 'text'\): id 'd3'"):
        embed(table(rows))
    with pytest.raises(ValueError, match=r"no text .* row 3 of the batch \(0-based\)"):
        sgpt.ray.Embed(**embed_kwargs(id_column=None))(table(rows))
    with pytest.raises(ValueError, match="no text .* id 'd3'"):  # pandas: None or NaN
        embed(table(rows).to_pandas())
    # allow_empty embeds an empty text as the bare brackets, as Model.encode does
    rows[3]["text"] = ""
    rows[1]["title"] = None
    e = sgpt.ray.Embed(**embed_kwargs(allow_empty=True))
    got = np.array(e(table(rows)).column("embedding").to_pylist(), np.float32)
    joined = ["Paris Paris is the capital of France.", "", "  Ünïcödé — 東京 🙂", "",
              "Flags -a text that looks like a flag"]
    assert np.array_equal(got, e.model.encode(joined, kind="document", allow_empty=True))
    with pytest.raises(TypeError, match=r"must hold str: 1 row\(s\) do not \(the first is int\): id 'd0'"):
        embed({"id": np.array(["d0"]), "text": np.array([5], dtype=object), "title": np.array([None])})


def test_bad_setup_is_reported():
    with pytest.raises(TypeError, match="kind"):
        sgpt.ray.Embed(str(MODEL), device="cpu")  # kind is required
    with pytest.raises(ValueError, match="unknown kind 'passage'"):
        sgpt.ray.Embed(str(MODEL), kind="passage", device="cpu")
    with pytest.raises(FileNotFoundError):
        sgpt.ray.Embed("/nonexistent/model", kind="document", device="cpu")
    e = sgpt.ray.Embed(**embed_kwargs(text_column="body"))
    with pytest.raises(ValueError, match="text_column 'body' is not a column of the batch"):
        e(table(DOCS[:1]))
    with pytest.raises(TypeError, match="expected a pyarrow Table"):
        e([{"text": "x"}])


# -- tools/ray_embed.py ------------------------------------------------------------------------------

def write_inputs(d: Path, files: dict[str, list[dict]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), d / name, row_group_size=7)
        else:
            (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_script(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--model", str(MODEL), "--device", "cpu",
                           "--actors", "2", "--cpus-per-actor", "1", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, **kw)


def output(path: Path) -> tuple[list, np.ndarray]:
    t = pq.read_table(path)
    assert t.column_names[1] == "embedding"
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    vectors = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 64)
    return t.column(0).to_pylist(), vectors


def test_script_equals_the_cli_per_file(tmp_path, model):
    ints = [{"id": 100 + i, "text": r["text"], "title": r["title"]} for i, r in enumerate(DOCS[6:30])]
    files = {
        "a.parquet": DOCS[:20],
        "b.jsonl": DOCS[20:],
        "c.parquet": ints,  # integer ids stay integers
        "d.jsonl": [{"id": r["id"], "text": r["text"]} for r in DOCS[::-1]],  # no titles
        "e.jsonl": [],  # an empty input: an empty output
    }
    write_inputs(tmp_path / "in", files)
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    r = run_script("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                   "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert "ignoring 1 file(s)" in r.stderr
    rows_in = sum(map(len, files.values()))
    assert r.stdout.startswith(f"ray_embed: 5 file(s) done, 0 skipped, {rows_in} rows in "), r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["a.parquet", "b.parquet", "c.parquet", "d.parquet", "e.parquet"]
    for name, rows in files.items():
        ids, vectors = output(tmp_path / "out" / (Path(name).stem + ".parquet"))
        assert ids == [r["id"] for r in rows], name
        if rows:
            assert np.array_equal(vectors, cli_embed_jsonl(rows, tmp_path, "--kind", "document")), name
        else:
            assert vectors.shape == (0, 64)
    meta = pq.read_schema(tmp_path / "out" / "a.parquet").metadata
    assert meta[b"sgpt.kind"] == b"document" and meta[b"sgpt.source"] == b"a.parquet"
    assert pq.read_schema(tmp_path / "out" / "c.parquet").field("id").type == pa.int64()


def test_script_error_names_the_row_and_leaves_no_partial_output(tmp_path):
    bad = [dict(r) for r in DOCS[:10]]
    bad[6]["text"], bad[6]["title"] = "   ", None  # (with a title it would not be empty)
    write_inputs(tmp_path / "in", {"a.jsonl": DOCS[10:20], "b.jsonl": bad})
    r = run_script("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                   "--batch-size", "4")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"ray_embed: error: {tmp_path / 'in' / 'b.jsonl'}: line 7 (id 'd6'): empty or whitespace-only text; pass --allow-empty" in r.stderr
    # a.jsonl may or may not have finished before the error stopped the run; b never does,
    # and no temp file is left behind
    assert not (tmp_path / "out" / "b.parquet").exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_script_takes_no_leftover_temp_file_for_a_finished_one(tmp_path, model):
    rows = DOCS[:12]
    write_inputs(tmp_path / "in", {"a.jsonl": rows, "b.jsonl": DOCS[12:]})
    out = tmp_path / "out"
    out.mkdir()
    # what a killed run leaves: a partial file under the temp name (here a truncated Parquet
    # file of the right rows) and nothing under the final name
    pq.write_table(pa.table({"id": ["d0"], "embedding": [[0.0] * 64]}), out / ".a.parquet.partial")
    (out / ".a.parquet.partial").write_bytes((out / ".a.parquet.partial").read_bytes()[:40])
    # and a finished b.parquet from an earlier run, which must be kept as it is
    b_done = out / "b.parquet"
    pq.write_table(pa.table({"id": ["kept"], "embedding": [[1.0] * 64]}), b_done)
    before = b_done.stat()
    r = run_script("--input", str(tmp_path / "in"), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ray_embed: 1 file(s) done, 1 skipped, 12 rows in ")
    ids, vectors = output(out / "a.parquet")
    assert ids == [r["id"] for r in rows]
    assert np.array_equal(vectors, model.encode_corpus(rows))
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "b.parquet"]
    after = b_done.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def processes_marked(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (inherited by all that a run started)."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_for_processes_marked(marker: str, timeout: float = 60.0) -> None:
    """Waits until the processes of a killed run are gone: the local Ray it started has a reaper
    that ends Ray's daemons and workers soon after the driver dies. Any left after ``timeout``
    are killed here, by their ids, so that no test leaves processes behind."""
    deadline = time.monotonic() + timeout
    while processes_marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in processes_marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_killed_run_resumes(tmp_path, model):
    # Enough work that the run is still going when the first file is done: 5 files of long
    # texts, each one block for one actor, about half a second of work on this machine.
    n = 200
    files = {f"part-{k}.jsonl": [{"id": f"p{k}-{i}", "title": f"t{i % 5}",
                                 "text": f"{k} {i} " + LONG[: 100 + 23 * (i % 40)]} for i in range(n)]
             for k in range(5)}
    write_inputs(tmp_path / "in", files)
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--model", str(MODEL), "--device", "cpu", "--actors", "2",
            "--cpus-per-actor", "1", "--batch-size", "32", "--input", str(tmp_path / "in"),
            "--output", str(out)]
    marker = f"SGPT_TEST_RUN={tmp_path}"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "SGPT_TEST_RUN": str(tmp_path)})
    finished: list[Path] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while not finished and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            finished = sorted(out.glob("*.parquet")) if out.exists() else []
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script (Ray's daemons run in their own sessions)
        _, err = proc.communicate(timeout=60)
        t = time.monotonic()
        wait_for_processes_marked(marker)
        print(f"the killed run's processes were gone {time.monotonic() - t:.1f} s after the kill")
    assert finished, f"no output finished before the run ended (status {proc.returncode}): {err}"
    finished = sorted(out.glob("*.parquet"))
    assert 1 <= len(finished) < len(files), f"the run was not cut short: {finished}"
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    r = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    left = len(files) - len(finished)
    assert r.stdout.startswith(f"ray_embed: {left} file(s) done, {len(finished)} skipped, {n * left} rows")
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).stem + ".parquet" for n in files)
    for name, (ino, mtime) in stats.items():  # not rewritten
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), name
    for name, rows in files.items():
        ids, vectors = output(out / (Path(name).stem + ".parquet"))
        assert ids == [r["id"] for r in rows], name
        assert np.array_equal(vectors, model.encode_corpus(rows)), name


# -- the script's pieces that make it sure: order, reading ------------------------------------------

def load_script():
    """tools/ray_embed.py as a module (registered first: its dataclasses look themselves up)."""
    if "ray_embed" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ray_embed", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ray_embed"] = module
        spec.loader.exec_module(module)
    return sys.modules["ray_embed"]


def test_writer_puts_rows_in_input_order_whatever_order_they_come_in(tmp_path, monkeypatch):
    m = load_script()
    monkeypatch.setattr(m, "ROW_GROUP_ROWS", 16)
    job = m.Job(0, tmp_path / "x.jsonl", "jsonl", tmp_path / "x.parquet", rows=50)
    ids = pa.array([f"id{i}" for i in range(50)])
    vectors = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    w = m.Writer(job, ids, "doc_id", 4, {"k": "v"})
    rng = np.random.default_rng(7)
    order = rng.permutation(50)
    for piece in np.array_split(order, 9):  # pieces in any order, rows shuffled within
        assert not w.complete
        w.add(piece.astype(np.int64), vectors[piece])
    assert w.complete and not w.pending
    w.finish()
    assert not job.tmp.exists()
    t = pq.read_table(job.out)
    assert t.column("doc_id").to_pylist() == ids.to_pylist()
    assert np.array_equal(np.array(t.column("embedding").to_pylist(), np.float32), vectors)
    assert t.schema.metadata == {b"k": b"v"}

    def writer(name: str) -> "m.Writer":
        return m.Writer(m.Job(1, job.src, "jsonl", tmp_path / name, rows=50), ids, "id", 4, {})

    w1 = writer("in-order.parquet")  # rows in order are written as they come, in row groups
    for lo in range(0, 50, 10):
        w1.add(np.arange(lo, lo + 10), vectors[lo:lo + 10])
    w1.finish()
    f = pq.ParquetFile(tmp_path / "in-order.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [20, 20, 10]
    assert np.array_equal(np.array(f.read().column("embedding").to_pylist(), np.float32), vectors)

    w2 = writer("y.parquet")
    w2.add(np.arange(0, 10), vectors[:10])
    with pytest.raises(m.Failure, match="row 5 came back twice"):
        w2.add(np.arange(5, 8), vectors[5:8])
    w3 = writer("z.parquet")  # an overlap that is found when the rows are all in
    for lo, hi in [(0, 10), (20, 30), (25, 35), (10, 20)]:
        w3.add(np.arange(lo, hi), vectors[lo:hi])
    with pytest.raises(m.Failure, match="rows came back twice"):
        w3.add(np.arange(30, 50), vectors[30:50])


def test_reader_checks_jsonl_as_sgpt_embed(tmp_path):
    m = load_script()
    cols = {"text": "text", "title": "title", "id": "id", "title_required": False, "allow_empty": False}
    src = tmp_path / "x.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "a", "title": "T"}\n{"id": 2, "text": "b"}\n\n\n')
    blocks = list(m.read_file(3, str(src), "jsonl", cols))
    assert len(blocks) == 1 and blocks[0].to_pylist() == [
        {"text": "a", "title": "T", "__file": 3, "__row": 0},
        {"text": "b", "title": None, "__file": 3, "__row": 1}]
    assert m.count_rows(m.Job(0, src, "jsonl", tmp_path / "o")) == 2
    src.write_text('{"id": 1, "text": "a"}\n\n{"id": 2, "text": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is blank"):
        list(m.read_file(0, str(src), "jsonl", cols))
    src.write_text('{"id": 1, "text": "a"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"line 2 \(id 2\): no text"):
        list(m.read_file(0, str(src), "jsonl", cols))


# -- in Ray Data: two CPU actors (last, so that the subprocess tests above run without this Ray) --

@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.parametrize("batch_format", ["pyarrow", "pandas", "numpy"])
def test_map_batches_with_two_actors_equals_the_cli(ray_session, want, batch_format):
    # several blocks, batches that cut across them: every actor sees several batches
    t = table(DOCS)
    ds = ray.data.from_arrow([t.slice(0, 13), t.slice(13, 9), t.slice(22)])
    ds = ds.map_batches(sgpt.ray.Embed, fn_constructor_kwargs=embed_kwargs(),
                        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1, batch_size=5,
                        batch_format=batch_format)
    out = ds.to_pandas()
    assert out["id"].tolist() == [r["id"] for r in DOCS]  # ids and order kept
    assert out["extra"].tolist() == list(range(len(DOCS)))
    got = np.stack([np.asarray(v, np.float32) for v in out["embedding"]])
    assert got.dtype == np.float32 and np.array_equal(got, want)
