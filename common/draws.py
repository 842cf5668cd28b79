"""Counter-based random draws: every number a view uses is a pure function of where it sits.

A view's key is ``(plan seed, stream, epoch, sample index)`` hashed with splitmix64; a draw is
``slot`` number ``s`` of a key. There is no generator state to carry, so the same view comes out
whatever the worker count, world size, batch size or processing order, and one parameter's
draws never depend on how many another one needed.

Two kinds of stream:

- the **base stream** of a view (the key itself, fixed slots): the crop, flip and mixup draws
  of the original presets, whose slot layout (:data:`OWN`, :data:`PARTNER`, ...) is part of the
  cache format: caches made before view ops existed replay from it;
- an **op stream** per view op (:func:`op_keys`: the view key and the op's position in the
  pipeline, and whether it draws for the mixing partner). An op that needs a variable number of
  draws (a Beta, a rejection loop, per-pixel noise) takes a :func:`generator` of its own,
  NumPy's counter-based Philox keyed by the op stream, so it never shifts another op's draws.
"""

from __future__ import annotations

import numpy as np

_GAMMA_INT = 0x9E3779B97F4A7C15  # golden-ratio increment of splitmix64
_GAMMA = np.uint64(_GAMMA_INT)
_OP_STREAM = 0x6F70  # "op": keeps op streams apart from the base stream's slots
INCEPTION_TRIES = 10  # as torchvision's RandomResizedCrop

# Base-stream slots (fixed offsets, not "the next draw"). Part of the cache format.
OWN, PARTNER = 0, 32  # base slot of the own crop and of the partner's crop
CROP_POS = 2 * INCEPTION_TRIES  # two draws per attempt (area, log aspect), then y and x
FLIP = CROP_POS + 2
PICK_PARTNER, LAM = 64, 65


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def times_gamma(n: int) -> np.uint64:
    """``n * gamma`` modulo 2**64, computed on Python ints (numpy scalars warn on wrap-around)."""
    return np.uint64((n * _GAMMA_INT) % 2**64)


def view_keys(plan_seed: int, epoch: int, indices: np.ndarray, stream: int = 0) -> np.ndarray:
    """Generator keys of the views of ``indices`` (N,) int -> (N,) uint64."""
    head = np.array([(plan_seed + stream * _GAMMA_INT) % 2**64], dtype=np.uint64)
    head = mix64(mix64(head) + times_gamma(epoch))
    return mix64(head + np.asarray(indices, dtype=np.uint64) * _GAMMA)


def uniform(keys: np.ndarray, slot: int) -> np.ndarray:
    """Draw number ``slot`` of each key: (N,) float64 uniform on [0, 1)."""
    bits = mix64(keys + times_gamma(slot + 1)) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / 2**53)


def normal(keys: np.ndarray, slot: int) -> np.ndarray:
    """A standard normal from draws ``slot`` and ``slot + 1`` (Box-Muller): (N,) float64."""
    u1 = 1.0 - uniform(keys, slot)  # (0, 1]: log is finite
    u2 = uniform(keys, slot + 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def op_keys(keys: np.ndarray, position: int, partner: bool = False) -> np.ndarray:
    """The keys of op number ``position``'s own stream (or its mixing partner's): (N,) uint64."""
    salt = (_OP_STREAM << 8 | position << 1 | int(partner)) & 0xFFFFFFFF
    return mix64(keys ^ mix64(np.array([salt], dtype=np.uint64)))


def generator(key: np.uint64 | int) -> np.random.Generator:
    """A counter-based generator (Philox) of one op stream, for a variable number of draws."""
    return np.random.Generator(np.random.Philox(key=int(key)))


def key_bits(keys: np.ndarray) -> np.ndarray:
    """Keys as stored where a row needs its stream again at render time: (N,) uint32."""
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
