"""Ray Data integration: :class:`Embed`, a callable class for ``Dataset.map_batches``.

    >>> import ray, sgpt.ray
    >>> ds = ray.data.read_parquet("corpus/")                     # columns id, title, text
    >>> ds = ds.map_batches(
    ...     sgpt.ray.Embed,
    ...     fn_constructor_kwargs={"model": "/models/sgpt-bloom-7b1", "kind": "document",
    ...                            "title_column": "title", "id_column": "id"},
    ...     compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1,   # 4 actors, a GPU each
    ...     batch_size=1024, batch_format="pyarrow")
    >>> ds.select_columns(["id", "embedding"]).write_parquet("embeddings/")

Each actor opens the model once (in the constructor) and embeds every batch it is given: the
vectors are exactly ``sgpt.Model.encode``'s (and so ``sgpt embed``'s) for the same texts on the
same device. Importing this module needs Ray Data (``pip install "ray[data]"``); the rest of the
package does not. ``tools/ray_embed.py`` is a ready-made script (directory of Parquet/JSONL files →
Parquet, resumable); docs/scale-out.md covers clusters and sizing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from os import PathLike
from typing import Any, Optional, Union

try:
    import pandas as pd
    import pyarrow as pa
    import ray
except ImportError as e:  # pragma: no cover - exercised by a test in a subprocess
    raise ImportError(
        f"sgpt.ray needs Ray Data ({e.name} is not installed): pip install \"ray[data]\" "
        "(the rest of the sgpt package works without it)"
    ) from e

import numpy as np

from . import Model, _join_title

__all__ = ["Embed"]

#: What ``map_batches`` hands a UDF, by ``batch_format``: "pyarrow" → a Table, "pandas" → a
#: DataFrame, "numpy"/"default" → a dict of numpy arrays (a dict of lists is accepted too).
Batch = Union["pa.Table", "pd.DataFrame", dict[str, Any]]

_KINDS = ("query", "document")


def _is_null(x: Any) -> bool:
    """A missing value as the batch formats write it: None (pyarrow, numpy object arrays), NaN
    (pandas' default string dtype), pd.NA."""
    return x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA


def _listed(labels: list[str], total: int) -> str:
    """The first ten of ``total`` labels, then "and N more" (as the engine's messages)."""
    shown = ", ".join(labels[:10])
    return shown + (f" and {total - 10} more" if total > 10 else "")


class Embed:
    """Embeds a text column of each batch: a callable class for ``Dataset.map_batches``.

    Pass the class (not an instance) to ``map_batches`` with these arguments in
    ``fn_constructor_kwargs``, and ``compute=ray.data.ActorPoolStrategy(size=N)`` (or, before Ray
    2.51, ``concurrency=N``) for N actors, with ``num_gpus=1`` (one GPU per actor) or
    ``num_cpus=C`` (CPU actors). The rows of a batch keep their order; for the whole dataset's
    order set ``DataContext.get_current().execution_options.preserve_order = True``.

    Args:
        model: the model directory; on a cluster it must exist at this path on every node that
            runs an actor.
        kind: "query" (brackets ``[ ]``) or "document" (``{ }``). Required: a corpus is usually
            documents, but ``sgpt``'s default elsewhere is query, and a silent choice would give
            wrong vectors.
        device, dtype: as ``sgpt.Model`` ("auto", "cpu", "cuda", "cuda:N"; "f16"/"bf16" on the
            GPU). With ``num_gpus=1`` Ray makes the actor's GPU the only visible one, so "auto" or
            "cuda" use it.
        text_column: the column to embed (str values).
        title_column: if given, a row's title is joined as ``title + " " + text``, exactly as
            ``Model.encode_corpus`` and ``sgpt embed`` join a JSONL "title"; a null or empty title
            leaves the text alone.
        output_column: the column written: one float32 vector per row (a fixed-size list in a
            pyarrow batch, a 2-D array in a numpy batch, one 1-D array per row in pandas). A column
            of that name already in the batch is replaced.
        id_column: a column that names rows in error messages (e.g. "id"); optional.
        normalize: scale each vector to unit length.
        allow_empty: embed empty or whitespace-only texts as the bare brackets (as
            ``Model.encode``'s ``allow_empty``); by default they are a ValueError naming the rows.
            A null text is always a ValueError.
        max_batch_tokens, threads: as ``sgpt.Model``. With ``device="cpu"`` and no ``threads``,
            the forward uses as many threads as CPUs Ray assigned to the actor (``num_cpus``),
            so actors sharing a node do not each take every core.

    Every other column is kept, and rows stay in the order given.
    """

    def __init__(
        self,
        model: Union[str, PathLike[str]],
        *,
        kind: str,
        device: str = "auto",
        dtype: Optional[str] = None,
        text_column: str = "text",
        title_column: Optional[str] = None,
        output_column: str = "embedding",
        id_column: Optional[str] = None,
        normalize: bool = False,
        allow_empty: bool = False,
        max_batch_tokens: Optional[int] = None,
        threads: Optional[int] = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}: expected \"query\" or \"document\"")
        if threads is None and device == "cpu":
            threads = _assigned_cpus()
        self.kind = kind
        self.text_column = text_column
        self.title_column = title_column
        self.output_column = output_column
        self.id_column = id_column
        self.normalize = normalize
        self.allow_empty = allow_empty
        self.model = Model(
            model, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens, threads=threads
        )

    def __call__(self, batch: Batch) -> Batch:
        if isinstance(batch, pa.Table):
            vectors = self._vectors(batch.column_names, lambda c: batch.column(c).to_pylist())
            column = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1]
            )
            if self.output_column in batch.column_names:
                return batch.set_column(
                    batch.column_names.index(self.output_column), self.output_column, column
                )
            return batch.append_column(self.output_column, column)
        if isinstance(batch, pd.DataFrame):
            vectors = self._vectors(list(batch.columns), lambda c: batch[c].tolist())
            out = batch.copy(deep=False)
            out[self.output_column] = list(vectors)
            return out
        if isinstance(batch, Mapping):
            vectors = self._vectors(list(batch.keys()), lambda c: list(batch[c]))
            out_dict = dict(batch)
            out_dict[self.output_column] = vectors
            return out_dict
        raise TypeError(
            f"sgpt.ray.Embed got a batch of type {type(batch).__name__}: expected a pyarrow "
            "Table, a pandas DataFrame or a dict of arrays (batch_format \"pyarrow\", \"pandas\", "
            "\"numpy\" or \"default\")"
        )

    def _vectors(self, columns: list[str], values: Any) -> np.ndarray:
        """float32 [rows, hidden] for the batch whose column names are ``columns``;
        ``values(name)`` gives a column as a list."""
        for role, name in (("text_column", self.text_column), ("title_column", self.title_column),
                           ("id_column", self.id_column)):
            if name is not None and name not in columns:
                raise ValueError(
                    f"sgpt.ray.Embed: {role} {name!r} is not a column of the batch "
                    f"(columns: {', '.join(map(str, columns))})"
                )
        texts: list[Any] = values(self.text_column)
        titles: list[Any] = (
            values(self.title_column) if self.title_column is not None else [None] * len(texts)
        )
        ids: Optional[list[Any]] = values(self.id_column) if self.id_column is not None else None

        def rows(indices: list[int]) -> str:
            """The rows at ``indices``, by id when there is an id column."""
            if ids is None:
                return f"row {_listed([str(i) for i in indices], len(indices))} of the batch (0-based)"
            labels = [repr(_plain(ids[i])) for i in indices]
            return f"{self.id_column} {_listed(labels, len(indices))}"

        nulls = [i for i, t in enumerate(texts) if _is_null(t)]
        if nulls:
            raise ValueError(
                f"sgpt.ray.Embed: {len(nulls)} row(s) have no text (null in column "
                f"{self.text_column!r}): {rows(nulls)}"
            )
        wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if wrong:
            raise TypeError(
                f"sgpt.ray.Embed: column {self.text_column!r} must hold str: {len(wrong)} row(s) "
                f"do not (the first is {type(texts[wrong[0]]).__name__}): {rows(wrong)}"
            )
        joined: list[str] = []
        for i, (title, text) in enumerate(zip(titles, texts)):
            if _is_null(title):
                title = None
            elif not isinstance(title, str):
                raise TypeError(
                    f"sgpt.ray.Embed: column {self.title_column!r} must hold str or null, not "
                    f"{type(title).__name__}: {rows([i])}"
                )
            joined.append(_join_title(title, str(text)))
        if not self.allow_empty:
            # The engine's own test (Python's str.rstrip(), as the tokenizer sees the text), here
            # so that the message names rows by id instead of by their index in the batch.
            empty = [i for i, t in enumerate(joined) if not t.rstrip()]
            if empty:
                raise ValueError(
                    f"sgpt.ray.Embed: {len(empty)} empty or whitespace-only text(s) in column "
                    f"{self.text_column!r}: {rows(empty)}; pass allow_empty=True to "
                    "embed them as the reference does (brackets only)"
                )
        return self.model.encode(
            joined, kind=self.kind, normalize=self.normalize, allow_empty=self.allow_empty
        )

    def __repr__(self) -> str:
        return (
            f"sgpt.ray.Embed({self.model!r}, kind={self.kind!r}, text_column={self.text_column!r}, "
            f"title_column={self.title_column!r}, output_column={self.output_column!r})"
        )


def _plain(x: Any) -> Any:
    """A numpy scalar as the Python value (so an id prints as 7, not np.int64(7))."""
    return x.item() if isinstance(x, np.generic) else x


def _assigned_cpus() -> Optional[int]:
    """The CPUs Ray assigned to this actor (rounded down, at least 1), or None outside Ray."""
    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - outside a worker (e.g. the driver): no assignment
        return None
    return max(1, int(cpus)) if cpus else None
