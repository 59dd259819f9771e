#!/usr/bin/env python3
"""Embed a directory of Parquet or JSONL files into Parquet with Ray Data and sgpt.ray.Embed.

    python tools/ray_embed.py --model DIR --input CORPUS_DIR --output EMB_DIR [--address auto]

Each input file gives one output file of the same stem (``corpus/part-7.jsonl`` →
``EMB_DIR/part-7.parquet``) with two columns: the id (as ``--id-column`` names it, its type kept)
and ``embedding`` (fixed-size list of float32, the model's hidden size), rows in the input's order.
One Ray actor per GPU (``--gpus-per-actor 1``, the default when the cluster has GPUs), or CPU
actors (``--cpus-per-actor N`` / ``--device cpu``).

Resumable: an output is written to ``EMB_DIR/.STEM.parquet.partial`` and renamed to its name only
when complete, so a finished output is skipped on a rerun (without being read) and a partial one
never looks finished; leftover ``.partial`` files are overwritten. Run it again after a failure
or kill and it does the rest.

Where things happen (the same on one machine or a multi-node cluster): the driver (this process)
lists the input directory and writes every output; the tasks that read the input files are pinned
to the driver's node (with num_cpus=0, so they run even on a head node with no CPUs for tasks),
and the texts travel through Ray's object store to the actors, which can be on any node. So the
input and output directories need only be on the driver's machine; the model directory and the
sgpt package must be on every node that runs an actor. See docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data
    import ray.exceptions

    import sgpt
    import sgpt.ray
except ImportError as e:
    sys.exit(f"ray_embed: {e}\n(needs the sgpt package, `pip install ./python`, and Ray Data, "
             "`pip install \"ray[data]\"`)")

PROG = "ray_embed"
FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
READ_ROWS = 1024  # rows per table a reader task yields
BLOCK_BYTES = 4 << 20  # DataContext.target_max_block_size
ROW_GROUP_ROWS = 8192  # rows per Parquet row group of an output (128 MiB at hidden 4096)
OUTPUT_COLUMN = "embedding"


class Failure(Exception):
    """An error reported as one line and exit status 1."""


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# -- inputs ------------------------------------------------------------------------------------


@dataclass
class Job:
    index: int
    src: Path
    fmt: str
    out: Path
    rows: int = 0

    @property
    def tmp(self) -> Path:
        return self.out.with_name(f".{self.out.name}.partial")


def list_inputs(input_dir: Path, fmt: str, output_dir: Path) -> list[Job]:
    """The input files (sorted by name, hidden files left out), each with its output path.

    ``--format auto`` takes *.parquet, *.jsonl and *.ndjson; an explicit format takes every
    regular file in the directory. Not recursive."""
    if not input_dir.is_dir():
        raise Failure(f"--input {input_dir}: not a directory")
    if output_dir.exists() and output_dir.resolve() == input_dir.resolve():
        raise Failure("--output must not be the --input directory (outputs would replace inputs)")
    jobs: list[Job] = []
    ignored: list[str] = []
    for path in sorted(input_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        kind = FORMATS.get(path.suffix.lower()) if fmt == "auto" else fmt
        if kind is None:
            ignored.append(path.name)
            continue
        jobs.append(Job(len(jobs), path, kind, output_dir / (path.stem + ".parquet")))
    if ignored:
        log(f"ignoring {len(ignored)} file(s) that are neither .parquet nor .jsonl/.ndjson "
            f"(pass --format to read them): {', '.join(ignored[:5])}{' …' if len(ignored) > 5 else ''}")
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.out in seen:
            raise Failure(f"{seen[job.out].name} and {job.src.name} would both be written to {job.out}")
        seen[job.out] = job.src
    if not jobs:
        raise Failure(f"--input {input_dir}: no input files")
    return jobs


def jsonl_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each line; blank lines at the end are not rows and a
    blank line elsewhere is an error, as in `sgpt embed`. A UTF-8 byte-order mark is dropped."""
    blank_at = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                blank_at = blank_at or number
                continue
            if blank_at:
                raise ValueError(f"{path}: line {blank_at} is blank (a JSONL line must be an object)")
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"{path}: line {number}: invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {number}: expected a JSON object, not {type(obj).__name__}")
            yield number, obj


def count_rows(job: Job) -> int:
    """Rows in an input file: Parquet's metadata, or a JSONL file's lines up to the last one
    that is not blank (as jsonl_lines reads them; a blank line before it fails when read)."""
    if job.fmt == "parquet":
        return pq.ParquetFile(job.src).metadata.num_rows
    rows = 0
    with open(job.src, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                rows = number
    return rows


def read_ids(job: Job, id_column: str) -> pa.Array:
    """The id column of an input file, in order (read by the driver, which writes the output)."""
    if job.fmt == "parquet":
        names = pq.ParquetFile(job.src).schema_arrow.names
        if id_column not in names:
            raise Failure(f"{job.src}: no id column {id_column!r} (columns: {', '.join(names)}); "
                          "pass --id-column")
        return pq.read_table(job.src, columns=[id_column]).column(id_column).combine_chunks()
    ids = []
    for number, obj in jsonl_lines(job.src):
        if id_column not in obj:
            raise Failure(f"{job.src}: line {number} has no {id_column!r}; pass --id-column")
        ids.append(obj[id_column])
    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise Failure(f"{job.src}: the {id_column!r} values do not share one type: {e}") from None


# -- reading, in Ray tasks on the driver's node -------------------------------------------------


def check_texts(src: str, labels: list[str], texts: list[Any], titles: list[Any], allow_empty: bool) -> None:
    """Names the file and row of a text that cannot be embedded (before any actor sees it)."""
    for label, text, title in zip(labels, texts, titles):
        if text is None:
            raise ValueError(f"{src}: {label}: no text (null or missing)")
        if not isinstance(text, str):
            raise ValueError(f"{src}: {label}: the text is a {type(text).__name__}, not a string")
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{src}: {label}: the title is a {type(title).__name__}, not a string")
        if not allow_empty and not (f"{title} {text}" if title else text).rstrip():
            raise ValueError(f"{src}: {label}: empty or whitespace-only text; pass --allow-empty "
                             "to embed it as the reference does (brackets only)")


def read_file(index: int, src: str, fmt: str, cols: dict[str, Any]) -> Iterator[pa.Table]:
    """Blocks of (text, title, __file, __row) for one input file."""
    text_col, title_col, id_col = cols["text"], cols["title"], cols["id"]
    start = 0

    def block(texts: list[Any], titles: list[Any]) -> pa.Table:
        nonlocal start
        n = len(texts)
        table = pa.table({
            "text": pa.array(texts, pa.string()),
            "title": pa.array(titles, pa.string()),
            "__file": pa.array(np.full(n, index, np.int32)),
            "__row": pa.array(np.arange(start, start + n, dtype=np.int64)),
        })
        start += n
        return table

    if fmt == "parquet":
        pf = pq.ParquetFile(src)
        names = pf.schema_arrow.names
        if text_col not in names:
            raise ValueError(f"{src}: no text column {text_col!r} (columns: {', '.join(names)}); pass --text-column")
        if cols["title_required"] and title_col not in names:
            raise ValueError(f"{src}: no title column {title_col!r} (columns: {', '.join(names)})")
        use_title = title_col is not None and title_col in names
        wanted = [text_col] + ([title_col] if use_title else []) + ([id_col] if id_col in names else [])
        for batch in pf.iter_batches(batch_size=READ_ROWS, columns=list(dict.fromkeys(wanted))):
            texts = batch.column(text_col).to_pylist()
            titles = batch.column(title_col).to_pylist() if use_title else [None] * len(texts)
            ids = batch.column(id_col).to_pylist() if id_col in names else None
            labels = [f"row {start + i}" + (f" (id {ids[i]!r})" if ids else "") for i in range(len(texts))]
            check_texts(src, labels, texts, titles, cols["allow_empty"])
            yield block(texts, titles)
        return

    texts, titles, labels = [], [], []
    for number, obj in jsonl_lines(Path(src)):
        texts.append(obj.get(text_col))
        titles.append(obj.get(title_col) if title_col is not None else None)
        labels.append(f"line {number}" + (f" (id {obj[id_col]!r})" if id_col in obj else ""))
        if len(texts) == READ_ROWS:
            check_texts(src, labels, texts, titles, cols["allow_empty"])
            yield block(texts, titles)
            texts, titles, labels = [], [], []
    if texts:
        check_texts(src, labels, texts, titles, cols["allow_empty"])
        yield block(texts, titles)


def read_files(batch: Any, cols: dict[str, Any]) -> Iterator[pa.Table]:
    """map_batches UDF over the dataset of input files (one row per file)."""
    for index, src, fmt in zip(batch["index"], batch["src"], batch["fmt"]):
        yield from read_file(int(index), str(src), str(fmt), cols)


class EmbedForFiles(sgpt.ray.Embed):
    """sgpt.ray.Embed returning only what the driver needs (no text back through Ray)."""

    def __call__(self, batch: pa.Table) -> pa.Table:  # type: ignore[override]
        out = super().__call__(batch)
        assert isinstance(out, pa.Table)
        return out.select(["__file", "__row", OUTPUT_COLUMN])


# -- writing, by the driver ---------------------------------------------------------------------


@dataclass
class Writer:
    """One output file: rows are written in input order, whatever order Ray returns them in
    (with preserve_order they come in order; pieces that come early wait in ``pending``)."""

    job: Job
    ids: pa.Array
    id_name: str
    hidden: int
    metadata: dict[str, str]
    next_row: int = 0
    pending: dict[int, np.ndarray] = field(default_factory=dict)
    _unwritten: list[np.ndarray] = field(default_factory=list)  # rows in order, not yet written
    _pq: Optional[pq.ParquetWriter] = None
    _written: int = 0

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(rows, kind="stable")
        rows, vectors = rows[order], vectors[order]
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        for r, v in zip(np.split(rows, cuts), np.split(vectors, cuts)):
            first = int(r[0])
            if first < self.next_row or first in self.pending or int(r[-1]) >= self.job.rows:
                raise Failure(f"{self.job.src}: row {first} came back twice or out of range")
            self.pending[first] = v
        while self.next_row in self.pending:
            v = self.pending.pop(self.next_row)
            self._unwritten.append(v)
            self.next_row += len(v)
        if self.next_row > self.job.rows or (self.next_row == self.job.rows and self.pending):
            raise Failure(f"{self.job.src}: rows came back twice")
        if self.next_row - self._written >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Writes the rows in order so far as one Parquet row group."""
        vectors = np.concatenate(self._unwritten) if self._unwritten else np.zeros((0, self.hidden), np.float32)
        table = self._table(self.ids.slice(self._written, len(vectors)), vectors)
        if self._pq is None:
            self._pq = pq.ParquetWriter(self.job.tmp, table.schema)
        if len(vectors) or self._written == 0:
            self._pq.write_table(table)
        self._written += len(vectors)
        self._unwritten = []

    def _table(self, ids: pa.Array, vectors: np.ndarray) -> pa.Table:
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), type=pa.float32()), self.hidden)
        schema = pa.schema([pa.field(self.id_name, ids.type), pa.field(OUTPUT_COLUMN, column.type)],
                           metadata=self.metadata)
        return pa.Table.from_arrays([ids, column], schema=schema)

    @property
    def complete(self) -> bool:
        return self.next_row == self.job.rows

    def finish(self) -> None:
        """Closes the temp file and renames it into place (atomically, after fsync)."""
        assert self.complete
        self._flush()  # (an empty input gives an empty output with the same columns)
        assert self._pq is not None and self._written == self.job.rows
        self._pq.close()
        fd = os.open(self.job.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.job.tmp, self.job.out)
        dir_fd = os.open(self.job.out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abandon(self) -> None:
        if self._pq is not None:
            try:
                self._pq.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.job.tmp.unlink(missing_ok=True)


def vectors_of(column: pa.ChunkedArray) -> np.ndarray:
    """The embedding column of a batch → float32 [rows, hidden]."""
    flat = column.combine_chunks()
    if not pa.types.is_fixed_size_list(flat.type):
        raise Failure(f"unexpected embedding column type {flat.type}")
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, flat.type.list_size)


def model_hidden_size(model: Path) -> int:
    """The hidden size from config.json (for an output with no rows, when no batch said it)."""
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        return int(config.get("hidden_size") or config["n_embed"])
    except (OSError, ValueError, KeyError) as e:
        raise Failure(f"{model}/config.json: cannot read the hidden size: {e}") from None


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ray_embed.py",
        description="Embed a directory of Parquet/JSONL files into Parquet (id + float32 "
                    "embedding per row) with Ray Data; resumable. See docs/scale-out.md.")
    p.add_argument("--model", required=True, type=Path,
                   help="model directory (the same path on every node that runs an actor)")
    p.add_argument("--input", required=True, type=Path, help="directory of input files (not recursive)")
    p.add_argument("--output", required=True, type=Path, help="directory for the outputs (created)")
    p.add_argument("--format", choices=["auto", "parquet", "jsonl"], default="auto",
                   help="auto (default): *.parquet, *.jsonl, *.ndjson by name; parquet/jsonl: every file")
    p.add_argument("--id-column", default="id", help="id column, copied to the output (default: id)")
    p.add_argument("--text-column", default="text", help="text column (default: text)")
    p.add_argument("--title-column", default=None,
                   help="title column, joined as title + ' ' + text (default: 'title' where a file "
                        "has it; '' for none)")
    p.add_argument("--kind", choices=["query", "document"], default="document",
                   help="bracket kind for every row (default: document)")
    p.add_argument("--normalize", action="store_true", help="unit-length vectors")
    p.add_argument("--allow-empty", action="store_true",
                   help="embed empty or whitespace-only texts as the bare brackets (else an error)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): GPU actors if the cluster has GPUs, else CPU actors")
    p.add_argument("--dtype", choices=["f16", "bf16"], default=None, help="GPU dtype (default f16)")
    p.add_argument("--actors", type=int, default=None,
                   help="number of actors (default: one per GPU, or the cluster's CPUs / --cpus-per-actor)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor (default 1)")
    res.add_argument("--cpus-per-actor", type=float, default=None,
                     help="CPU actors with this many CPUs each (implies --device cpu)")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="rows per batch handed to an actor (default 1024)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="the engine's packed batch size in tokens (as sgpt embed)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address: 'auto' (the cluster this node belongs to), HOST:PORT; "
                        "default: RAY_ADDRESS if set, else a new local Ray instance")
    args = p.parse_args(argv)
    for name in ("actors", "batch_size", "max_batch_tokens", "gpus_per_actor", "cpus_per_actor"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.device == "cpu" and args.gpus_per_actor is not None:
        p.error("--gpus-per-actor with --device cpu")
    if args.device == "cuda" and args.cpus_per_actor is not None:
        p.error("--cpus-per-actor means CPU actors, which cannot use --device cuda")
    if args.dtype and (args.device == "cpu" or args.cpus_per_actor is not None):
        p.error("--dtype is for the GPU (the CPU computes in f32)")
    return args


@dataclass
class Actors:
    device: str  # "cuda" or "cpu"
    count: int
    num_gpus: Optional[float] = None
    num_cpus: Optional[float] = None


def start_ray(args: argparse.Namespace) -> Actors:
    """Connects to (or starts) Ray; the actors to start."""
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if not (args.model / "config.json").is_file():
        if address == "local":
            raise Failure(f"--model {args.model}: no model directory (config.json) here")
        log(f"--model {args.model} is not on this machine: it must be on every node that runs an actor")
    if address == "local":
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    # Blocks come back in input order (Ray's default is any order); Writer also puts the rows of
    # a file in order, whatever order they come in, and checks that none is missing or twice.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = sys.stderr.isatty()
    # A task's outputs are joined into blocks of up to this size, and an actor takes whole blocks:
    # Ray's default (128 MiB) would make a whole input file one block for one actor. 4 MiB is
    # about 4000 texts of 1 KB, some seconds of work for one GPU.
    ctx.target_max_block_size = BLOCK_BYTES
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    gpu_actors = args.cpus_per_actor is None and (
        args.device == "cuda" or args.gpus_per_actor is not None or (args.device == "auto" and gpus > 0))
    if gpu_actors:
        # "cuda": the actor's GPU, as Ray makes the GPUs it assigned the only visible ones
        per = args.gpus_per_actor or 1.0
        actors = Actors("cuda", args.actors or max(1, int(gpus // per)), num_gpus=per)
    else:
        per = args.cpus_per_actor or 1.0
        actors = Actors("cpu", args.actors or max(1, int(resources.get("CPU", 1) // per)), num_cpus=per)
    log(f"{actors.count} {'GPU' if gpu_actors else 'CPU'} actor(s), {per:g} "
        f"{'GPU' if gpu_actors else 'CPU'}(s) each, on a cluster of {resources.get('CPU', 0):g} CPUs "
        f"and {gpus:g} GPUs")
    return actors


def embedded_batches(args: argparse.Namespace, jobs: list[Job]) -> Iterator[pa.Table]:
    """Ray Data's output for ``jobs``: blocks of (__file, __row, embedding)."""
    actors = start_ray(args)
    title_column = "title" if args.title_column is None else (args.title_column or None)
    cols = {"text": args.text_column, "title": title_column, "id": args.id_column,
            "title_required": bool(args.title_column), "allow_empty": args.allow_empty}
    # Readers run on the driver's node (only it needs the input files), taking no CPU slot, two
    # files at a time.
    driver_node = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    files = ray.data.from_items([{"index": j.index, "src": str(j.src), "fmt": j.fmt} for j in jobs])
    ds = files.map_batches(functools.partial(read_files, cols=cols), batch_size=1, num_cpus=0,
                           compute=ray.data.TaskPoolStrategy(size=2), label_selector=driver_node)
    ds = ds.map_batches(
        EmbedForFiles,
        fn_constructor_kwargs={
            "model": str(args.model.resolve()), "kind": args.kind, "device": actors.device,
            "dtype": args.dtype, "text_column": "text", "title_column": "title",
            "output_column": OUTPUT_COLUMN, "normalize": args.normalize,
            "allow_empty": args.allow_empty, "max_batch_tokens": args.max_batch_tokens},
        batch_size=args.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors.count), num_gpus=actors.num_gpus,
        num_cpus=actors.num_cpus, udf_modifying_row_count=False)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    jobs = list_inputs(args.input, args.format, args.output)
    args.output.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not j.out.exists()]
    skipped = len(jobs) - len(todo)
    for job in todo:
        job.tmp.unlink(missing_ok=True)  # left by a killed run: never read, rewritten
        job.rows = count_rows(job)
    total = sum(j.rows for j in todo)
    log(f"{len(jobs)} input file(s): {skipped} already done (skipped), {len(todo)} to do "
        f"({total} rows)")

    by_index = {j.index: j for j in todo}
    metadata = {"sgpt.model": str(args.model), "sgpt.kind": args.kind,
                "sgpt.normalize": str(args.normalize).lower(), "sgpt.version": sgpt.__version__}
    writers: dict[int, Writer] = {}
    hidden: Optional[int] = None
    done = rows_done = 0

    def open_writer(job: Job, hidden: int) -> Writer:
        ids = read_ids(job, args.id_column)
        if len(ids) != job.rows:
            raise Failure(f"{job.src}: {len(ids)} ids for {job.rows} rows")
        w = Writer(job, ids, args.id_column, hidden, dict(metadata, **{"sgpt.source": job.src.name}))
        writers[job.index] = w
        return w

    def finished(w: Writer) -> None:
        nonlocal done, rows_done
        w.finish()
        del writers[w.job.index]
        done += 1
        rows_done += w.job.rows
        took = time.perf_counter() - t0
        log(f"{w.job.out.name}: {w.job.rows} rows ({done}/{len(todo)} files, {rows_done}/{total} "
            f"rows, {took:.1f} s, {rows_done / took:.1f} rows/s)")

    try:
        batches = embedded_batches(args, [j for j in todo if j.rows]) if total else iter(())
        for batch in batches:
            if batch.num_rows == 0:
                continue
            vectors = vectors_of(batch.column(OUTPUT_COLUMN))
            hidden = vectors.shape[1]
            file_ids = batch.column("__file").to_numpy()
            rows = batch.column("__row").to_numpy()
            for index in np.unique(file_ids):
                job = by_index[int(index)]
                w = writers.get(job.index) or open_writer(job, hidden)
                sel = file_ids == index
                w.add(rows[sel], vectors[sel])
                if w.complete:
                    finished(w)
        if writers:
            w = next(iter(writers.values()))
            raise Failure(f"Ray returned only part of {w.job.src} ({w.next_row} of {w.job.rows} rows)")
        for job in todo:  # an empty input gives an empty output with the same columns
            if job.rows == 0:
                finished(open_writer(job, hidden or model_hidden_size(args.model)))
    except BaseException:
        for w in writers.values():
            w.abandon()
        raise
    took = time.perf_counter() - t0
    print(f"{PROG}: {done} file(s) done, {skipped} skipped, {rows_done} rows in {took:.1f} s "
          f"({rows_done / took:.1f} rows/s)", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    status, message = 0, ""
    try:
        run(args)
    except KeyboardInterrupt:
        status, message = 130, "interrupted; finished outputs are kept, rerun to do the rest"
    except Exception as e:  # noqa: BLE001 - one line, and exit status 1
        while isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, Exception):
            e = e.cause  # the error the task raised, without Ray's traceback
        known = (Failure, ValueError, TypeError, OSError)
        status, message = 1, f"error: {e}" if isinstance(e, known) else f"error: {type(e).__name__}: {e}"
    finally:
        if ray.is_initialized():
            ray.shutdown()  # (Ray's own messages come out here: ours is the last line)
    if message:
        log(message)
    return status


if __name__ == "__main__":
    sys.exit(main())
