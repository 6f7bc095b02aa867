"""In-memory training arrays whose rows are shared between samples (see :func:`mmtl.train.loop.feature_batches`)."""
from __future__ import annotations

import numpy as np


class RowIndexed:
    """A per-sample view of a shared table: sample ``i`` is ``table[rows[i]]``, so samples that share an input
    (e.g. the N questions of one image share its (T, D_v) tokens) store it once.

    ``table`` (M, ...) any dtype, ``rows`` (N,) int indices into it. Indexing with an int array / slice /
    int gives what ``table[rows][idx]`` would, without materialising ``table[rows]``.

    Raises:
        ValueError: ``rows`` is not 1-D or points outside ``table``.
    """

    def __init__(self, table: np.ndarray, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(table))):
            raise ValueError(f"rows must be a 1-D index into a table of {len(table)} rows")
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> np.ndarray:
        return self.table[self.rows[idx]]

    @property
    def shape(self) -> tuple:
        """``(N,) + table.shape[1:]``: the shape of the per-sample array this view stands for."""
        return (len(self.rows),) + tuple(self.table.shape[1:])

    @property
    def nbytes(self) -> int:
        """Bytes held (table + rows), not the bytes of the per-sample array."""
        return int(self.table.nbytes + self.rows.nbytes)
