"""The native half of the sgpt package (Rust, PyO3). Use ``sgpt.Model``, which wraps it."""

from os import PathLike
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

__version__: str

class Engine:
    """A model directory opened with the library's ``Embedder::open_with``."""

    def __new__(
        cls,
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
    ) -> Engine: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def max_seq_length(self) -> int: ...
    @property
    def info_json(self) -> str: ...
    def embed(
        self,
        texts: list[str],
        kind: str = "query",
        normalize: bool = False,
        show_progress: bool = False,
        allow_empty: bool = False,
    ) -> tuple[npt.NDArray[np.float32], list[int]]:
        """(float32 [len(texts), hidden], 0-based indices of the texts cut to the limit);
        the GIL is released meanwhile."""
        ...
