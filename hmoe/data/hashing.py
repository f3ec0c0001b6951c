"""splitmix64's finaliser: the one 64-bit mixing function of hmoe's stable hashes.

A bijection of uint64 in which every output bit depends on every input bit, so consecutive or
structured inputs (row indices, ids, partial string hashes) get unrelated outputs. Used for the
stream's hash subsets (hmoe.data.stream), the vocabulary spill partitions (hmoe.data.fit) and
the gAUC group sample (hmoe.train.metrics); the same input gives the same output in every run.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mix64"]


def mix64(x: np.ndarray) -> np.ndarray:
    """(any shape) uint64 -> uint64, splitmix64's finaliser (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
