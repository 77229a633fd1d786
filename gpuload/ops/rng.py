"""Counter-based random numbers: every draw is a pure function of (seed, epoch, row, draw index).

splitmix64's finaliser (a bijective 64-bit mixer) is applied to a key built from the four
integers; vectorised in numpy uint64 arithmetic (wrapping), no global or stateful RNG, so a
sample's augmentation does not depend on batch composition, worker count or order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mix64", "uniform"]

_M64 = (1 << 64) - 1
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_K_SEED = np.uint64(0x6A09E667F3BCC909)
_K_EPOCH = np.uint64(0xBB67AE8584CAA73B)
_K_ROW = np.uint64(0x3C6EF372FE94F82B)
_K_DRAW = np.uint64(0xA54FF53A5F1D36F1)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV53 = 1.0 / float(1 << 53)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (returns a new array)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * _C1
        z = (z ^ (z >> _S27)) * _C2
        return z ^ (z >> _S31)


def _u64(v: int) -> np.ndarray:
    return np.array([int(v) & _M64], dtype=np.uint64)


def uniform(seed: int, epoch: int, rows, draws) -> np.ndarray:
    """float64 array (len(rows), len(draws)) of uniforms in [0, 1), 53 bits each."""
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise ValueError(f"rows must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64, copy=False).astype(np.uint64).reshape(-1)
    draws = np.asarray(draws, dtype=np.int64).astype(np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        k = mix64(_u64(seed) ^ _K_SEED)
        k = mix64(k ^ mix64(_u64(epoch) + _K_EPOCH))
        rk = mix64(k ^ mix64(rows + _K_ROW))  # (B,)
        dk = mix64((draws + np.uint64(1)) * _GOLDEN + _K_DRAW)  # (D,)
        u = mix64(rk[:, None] ^ dk[None, :])
    return (u >> _S11).astype(np.float64) * _INV53
