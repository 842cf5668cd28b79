"""Which rows a rank trains on, in what order: a pure function of (seed, epoch, world, rank).

With ``--views-per-decode V`` the unit is a pass of V epochs (:func:`pass_batches`): the order
of its first epoch, each sample V times in a row.

Units are permuted per epoch, then rows are permuted inside windows of a few units (a shuffle
buffer across units that still lets a worker read each unit's tar and cache rows once). The
epoch's order is padded by wrapping around to a multiple of the global batch, so every rank takes
the same number of steps, and a resumed run can jump straight to its step.
"""

from __future__ import annotations

import numpy as np

from kdcache.errors import KdcacheError

_ORDER_STREAM = 0x6B64  # keeps the order generator apart from any other use of --seed


def epoch_order(counts: list[int], seed: int, epoch: int, window: int = 4) -> np.ndarray:
    """Global sample indices in training order for one epoch: (N,) int64."""
    rng = np.random.default_rng([_ORDER_STREAM, seed, epoch])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    units = rng.permutation(len(counts))
    parts = []
    for w in range(0, len(units), window):
        rows = np.concatenate([starts[u] + np.arange(counts[u]) for u in units[w : w + window]])
        parts.append(rng.permutation(rows))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_batches(
    order: np.ndarray, batch_size: int, world: int = 1, rank: int = 0
) -> list[np.ndarray]:
    """Split an epoch's order into this rank's batches of ``batch_size // world`` rows."""
    if batch_size % world:
        raise KdcacheError(
            f"batch size {batch_size} is not divisible by {world} processes; "
            "set --batch-size to a multiple of the world size"
        )
    if len(order) == 0:
        raise KdcacheError("the training data has no samples")
    steps = -(-len(order) // batch_size)
    padded = np.resize(order, steps * batch_size)  # wraps around: a few rows are seen twice
    per_rank = batch_size // world
    # Step s of every rank takes a contiguous slice of global batch s: ranks read nearby rows.
    batches = padded.reshape(steps, world, per_rank)[:, rank]
    return list(batches)


def pass_batches(
    order: np.ndarray, epoch: int, views: int, batch_size: int, world: int = 1, rank: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """One pass's batches for this rank: (global sample indices, their student epochs).

    One epoch (``views`` 1): the epoch's order in batches, and None (every row is at
    ``epoch``). A pass of V epochs: each sample of the order, V times in a row, at epochs
    ``epoch`` .. ``epoch + V - 1``: one decode of an image serves its V views, every view of
    the V epochs is trained once, and the order is a function of (seed, pass, world, rank).
    """
    if views == 1:
        return rank_batches(order, batch_size, world, rank), None
    entries = rank_batches(np.arange(len(order) * views), batch_size, world, rank)
    rows = [order[e // views] for e in entries]
    epochs = [epoch + e % views for e in entries]
    return rows, epochs
