"""SGPT-BLOOM sentence embeddings from Python, computed by the sgpt engine (Rust; CPU or CUDA).

    >>> import sgpt
    >>> model = sgpt.Model("models/sgpt-tiny", device="cpu")
    >>> q = model.encode(["what is a cat?"], kind="query")          # float32 [1, hidden]
    >>> d = model.encode_corpus([{"title": "Cat", "text": "A cat is a small feline."}])

`Model.encode` gives exactly the vectors `sgpt embed` writes for the same texts on the same
device (the same library call). `encode_queries`/`encode_corpus` are BEIR's dense-retrieval
interface, and `encode(..., prompt_type=...)` takes what MTEB passes. See python/README.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from os import PathLike
from typing import Any, Optional, Union

import numpy as np

from ._sgpt import Engine as _Engine
from ._sgpt import __version__

__all__ = ["Model", "__version__"]

logger = logging.getLogger("sgpt")

#: MTEB's prompt types (``PromptType`` values, or the strings) → the bracket kind.
_PROMPT_KINDS = {"query": "query", "passage": "document", "document": "document"}


#: The process that started the engine's threads (opening a model does): they do not survive
#: fork(), and a forked child that used them would wait forever, so it gets an error instead.
_engine_pid: Optional[int] = None


def _check_not_forked() -> None:
    if _engine_pid is not None and _engine_pid != os.getpid():
        raise RuntimeError(
            "sgpt was used in this process's parent before it forked, and its threads do not "
            "survive fork(): start worker processes with multiprocessing's 'spawn' (or "
            "'forkserver') start method, or open models only in the workers"
        )


def _prompt_kind(prompt_type: Any) -> str:
    """MTEB's ``prompt_type`` (a ``PromptType`` enum member or its string) → "query"/"document"."""
    value = getattr(prompt_type, "value", prompt_type)
    if isinstance(value, str) and value in _PROMPT_KINDS:
        return _PROMPT_KINDS[value]
    raise ValueError(
        f"unknown prompt_type {prompt_type!r}: expected \"query\", \"passage\" or \"document\""
    )


def _join_title(title: Any, text: str) -> str:
    """A document with a title is embedded as ``title + " " + text`` (SGPT's BEIR code and
    ``sgpt::tokenize::join_title``); an empty or missing title leaves the text alone."""
    return f"{title} {text}" if title else text


def _texts(sentences: Any) -> tuple[list[str], bool]:
    """The texts of ``sentences`` and whether a single string was given.

    Takes a str, any iterable of str (list, tuple, numpy array, generator), or an iterable of
    batches that are mappings with a "text" list (what MTEB 2's DataLoader yields)."""
    if isinstance(sentences, str):
        return [sentences], True
    if isinstance(sentences, Mapping):
        if "text" in sentences:
            return _texts(sentences["text"])[0], False
        raise TypeError("texts must be a str or an iterable of str, not a mapping without 'text'")
    if not isinstance(sentences, Iterable):
        raise TypeError(f"texts must be a str or an iterable of str, not {type(sentences).__name__}")
    texts: list[str] = []
    for item in sentences:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and "text" in item:
            batch = item["text"]
            texts.extend([batch] if isinstance(batch, str) else batch)
        else:
            texts.append(item)  # reported below with its index
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise TypeError(
            f"texts must be str: {len(bad)} item(s) are not, at index {shown} (0-based; "
            f"the first is {type(texts[bad[0]]).__name__})"
        )
    return texts, False


def _corpus_texts(corpus: Any) -> list[str]:
    """BEIR corpus → texts: a list of {"title", "text"} dicts, a dict of lists
    {"title": [...], "text": [...]}, or plain strings."""
    if isinstance(corpus, Mapping):
        if "text" not in corpus:
            raise ValueError("a corpus given as a dict of lists needs a 'text' list")
        texts = list(corpus["text"])
        titles = corpus.get("title")
        titles = [None] * len(texts) if titles is None else list(titles)
        if len(titles) != len(texts):
            raise ValueError(f"corpus has {len(titles)} titles for {len(texts)} texts")
        return [
            _join_title(t, x) if isinstance(x, str) else x for t, x in zip(titles, texts)
        ]
    out: list[str] = []
    for i, doc in enumerate(corpus):
        if isinstance(doc, str):
            out.append(doc)
        elif isinstance(doc, Mapping):
            if "text" not in doc:
                raise ValueError(f"corpus item {i} has no 'text'")
            text = doc["text"]
            out.append(_join_title(doc.get("title"), text) if isinstance(text, str) else text)
        else:
            raise TypeError(
                f"corpus item {i} is a {type(doc).__name__}: expected a dict with 'text' "
                "(and optionally 'title') or a str"
            )
    return out


class Model:
    """An SGPT-BLOOM model directory, opened once, embedding texts.

    Args:
        path: the model directory (config.json, tokenizer.json, model.safetensors or shards).
        device: "auto" (the GPU when usable, else the CPU; ``notice`` says why), "cpu",
            "cuda", "cuda:N", or one replica per GPU: "cuda:all" or a list like "cuda:0,2".
        dtype: activation/weight type on the GPU, "f16" (the default) or "bf16"; or "fp8":
            E4M3 GEMMs, on a GPU of compute capability >= 8.9 with f16 activations (not yet
            run on a GPU), or with device="cpu" the CPU emulation (docs/fp8.md); or
            "fp8-alternate": the same in every other block only.
            Otherwise the CPU computes in f32, so "f16"/"bf16" with device="cpu" is a
            ValueError.
        max_batch_tokens: most tokens in one packed batch (default 2048 on the CPU, 16384 on
            the GPU). Batching changes a vector by float rounding at most.
        threads: CPU threads of a pool owned by this model, for the forward (default: rayon's
            global pool, all cores; tokenization uses the global pool either way). 1 to 4 × the
            cores.
        attention, gemm, cuda_graphs, row_kernels: the GPU kernel choices, as the CLI's
            ``--attention`` (auto, v1, tc, mma, mma2), ``--gemm`` (cublaslt, skinny),
            ``--cuda-graphs`` and ``--row-kernels`` (v1, vec); anything but the defaults with
            device="cpu" is a ValueError.
        embedding_table: where the GPU keeps the embedding table, as ``--embedding-table``:
            "device", or "host" (page-locked host memory read over the bus; 2 GB less device
            memory at bloom-7b1, the same vectors; on trial). Only "device" with device="cpu".

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: a bad option, or model files that cannot be used (bad config, tensors).
        RuntimeError: the GPU asked for cannot be used (no driver, no such device, CUDA error).
    """

    def __init__(
        self,
        path: Union[str, PathLike[str]],
        device: str = "auto",
        dtype: Optional[str] = None,
        max_batch_tokens: Optional[int] = None,
        threads: Optional[int] = None,
        attention: str = "auto",
        gemm: str = "cublaslt",
        cuda_graphs: bool = False,
        row_kernels: str = "v1",
        embedding_table: str = "device",
    ) -> None:
        for name, value in (("max_batch_tokens", max_batch_tokens), ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        global _engine_pid
        _check_not_forked()
        _engine_pid = os.getpid()
        self._engine = _Engine(
            path, device, dtype, max_batch_tokens, threads, attention, gemm, cuda_graphs,
            row_kernels, embedding_table,
        )
        self.path = str(path)
        self.device = device
        self._info: dict[str, Any] = json.loads(self._engine.info_json)
        self._info.setdefault("threads", None)
        self._info.setdefault("kernels", None)
        if self._info.get("notice"):
            logger.info("sgpt: %s", self._info["notice"])

    # -- description ---------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width of an embedding."""
        return self._engine.hidden_size

    @property
    def max_seq_length(self) -> int:
        """Longest sequence in tokens, brackets included; texts are cut on the right to
        ``max_seq_length - 3`` tokens, as the reference does."""
        return self._engine.max_seq_length

    @property
    def info(self) -> dict[str, Any]:
        """What runs the forward: kind ("cpu"/"cuda"), device, dtype, threads (CPU), kernels
        (GPU), max_batch_tokens, and notice (why device="auto" chose the CPU, else None)."""
        return dict(self._info)

    @property
    def notice(self) -> Optional[str]:
        """Why device="auto" fell back to the CPU, or None."""
        return self._info.get("notice")

    def get_sentence_embedding_dimension(self) -> int:
        """sentence-transformers' name for ``hidden_size``."""
        return self.hidden_size

    def __repr__(self) -> str:
        i = self._info
        return f"sgpt.Model({self.path!r}, kind={i.get('kind')!r}, device={i.get('device')!r}, dtype={i.get('dtype')!r})"

    # -- embedding -----------------------------------------------------------------------------

    def encode(
        self,
        sentences: Any,
        kind: Optional[str] = None,
        normalize: bool = False,
        show_progress: bool = False,
        batch_size: Optional[int] = None,
        *,
        allow_empty: bool = False,
        prompt_type: Any = None,
        task_name: Optional[str] = None,
        convert_to_tensor: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Texts → float32 numpy array [len(texts), hidden] (1-D [hidden] for a single str).

        Args:
            sentences: a str, or an iterable of str (also MTEB 2's batches of {"text": [...]}).
            kind: "query" (brackets [ ]) or "document" ({ }); default "query".
            normalize: scale each vector to unit length (``normalize_embeddings`` also works).
            show_progress: a progress bar on stderr (``show_progress_bar`` also works).
            batch_size: accepted for compatibility and ignored: the engine packs batches by
                tokens (``max_batch_tokens``), and batching never changes a vector.
            allow_empty: embed empty or whitespace-only texts as the bare brackets instead of
                raising ValueError.
            prompt_type: MTEB's ``PromptType`` (or its value): "query" → query brackets,
                "passage"/"document" → document brackets. Overrides ``kind``'s default.
            task_name: accepted (MTEB passes it) and ignored.
            convert_to_tensor: return a torch tensor (sharing the array's memory).

        Other keyword arguments (MTEB's and BEIR's, e.g. ``convert_to_numpy``) are ignored.
        The GIL is released while embedding: other Python threads run meanwhile.
        """
        if prompt_type is not None:
            pkind = _prompt_kind(prompt_type)
            if kind is not None and kind != pkind:
                raise ValueError(f"kind={kind!r} contradicts prompt_type={prompt_type!r}")
            kind = pkind
        normalize = bool(normalize or kwargs.get("normalize_embeddings", False))
        show_progress = bool(show_progress or kwargs.get("show_progress_bar", False))
        texts, single = _texts(sentences)
        array = self._embed(texts, kind or "query", normalize, show_progress, allow_empty)
        if single:
            array = array[0]
        if convert_to_tensor:
            import torch  # type: ignore[import-not-found,unused-ignore]

            return torch.from_numpy(array)
        return array

    def encode_queries(self, queries: Any, batch_size: Optional[int] = None, **kwargs: Any) -> Any:
        """BEIR: queries → query vectors [len(queries), hidden]. Keyword arguments as ``encode``."""
        kwargs.pop("kind", None)
        kwargs.pop("prompt_type", None)
        return self.encode(queries, kind="query", batch_size=batch_size, **kwargs)

    def encode_corpus(self, corpus: Any, batch_size: Optional[int] = None, **kwargs: Any) -> Any:
        """BEIR: documents → document vectors [len(corpus), hidden].

        ``corpus`` is a list of {"title", "text"} dicts (a title is joined as ``title + " " +
        text``, as ``sgpt embed`` joins a JSONL "title"; an empty or missing one leaves the text
        alone), a dict of lists {"title": [...], "text": [...]}, or plain strings."""
        kwargs.pop("kind", None)
        kwargs.pop("prompt_type", None)
        return self.encode(_corpus_texts(corpus), kind="document", batch_size=batch_size, **kwargs)

    def _embed(
        self, texts: list[str], kind: str, normalize: bool, show_progress: bool, allow_empty: bool
    ) -> np.ndarray:
        _check_not_forked()
        array, cut = self._engine.embed(texts, kind, normalize, show_progress, allow_empty)
        if cut:
            shown = ", ".join(map(str, cut[:10])) + (f" and {len(cut) - 10} more" if len(cut) > 10 else "")
            logger.info(
                "%d of %d texts were longer than %d tokens and were truncated on the right, as the "
                "reference does (index %s, 0-based)",
                len(cut), len(texts), self.max_seq_length - 3, shown,
            )
        return array
