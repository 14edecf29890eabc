"""The raw outputs of many samples' generators at once: what ``corruption.generator(1, seed, epoch, sample_id)
.bit_generator.random_raw(width)`` gives for each sample of a batch, at a fraction of its cost.

A sample's generator is numpy's ``PCG64`` seeded with an integer (``corruption.mix_seed``); numpy turns the
integer into the generator's state through ``SeedSequence`` (hashing 32-bit words: about 30 us per sample in
numpy's own code, more than the corruption itself). Here the hashing of :func:`mix_seed` and of ``SeedSequence``
runs on the whole batch as array operations; the last step, PCG64's 128-bit seeding, is two Python integer
operations per sample, and one ``PCG64`` object per batch, set to each sample's state, draws its outputs.
``tests/data/test_batch_corruption.py`` checks every step against numpy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_M32 = 0xFFFFFFFF
_M128 = (1 << 128) - 1
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645      # PCG64's 128-bit LCG multiplier


def _consts(init: int, mult: int, n: int) -> np.ndarray:
    """SeedSequence's running hash constant: ``[2, n]`` uint32, the value xor-ed in and the next (multiplier)."""
    out, h = [], init
    for _ in range(n):
        nxt = (h * mult) & _M32
        out.append((h, nxt))
        h = nxt
    return np.array(out, np.uint32).T


_MIX_IN = _consts(0x43b0d7e5, 0x931e8875, 16)       # hashmix: 4 to fill the pool of 4 words, 12 to mix it
_DRAW_OUT = _consts(0x8b51f9dd, 0x58f38ded, 8)      # generate_state: 8 words (4 uint64)
_L, _R, _S = np.uint32(0xca01f9dd), np.uint32(0x4973f715), np.uint32(16)


def _hashmix(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    v = (v ^ c[0]) * c[1]
    return v ^ (v >> _S)


def seed_states(seeds: np.ndarray) -> np.ndarray:
    """``SeedSequence(seed).generate_state(4, np.uint64)`` of each seed (``[B]`` uint64 below 2**64) -> ``[B, 4]``
    uint64."""
    seeds = np.asarray(seeds, np.uint64)
    pool = np.zeros((4, len(seeds)), np.uint32)        # the seed's 32-bit words, low first, padded with 0
    pool[0] = seeds & np.uint64(_M32)
    pool[1] = seeds >> np.uint64(32)
    with np.errstate(over="ignore"):
        pool = _hashmix(pool, _MIX_IN[:, :4, None])
        for src in range(4):
            dst = [d for d in range(4) if d != src]
            mixed = _hashmix(pool[src][None], _MIX_IN[:, 4 + 3 * src:7 + 3 * src, None])
            r = _L * pool[dst] - _R * mixed
            pool[dst] = r ^ (r >> _S)
        words = _hashmix(pool[[0, 1, 2, 3, 0, 1, 2, 3]], _DRAW_OUT[:, :, None])      # [8, B]
    return np.ascontiguousarray(words.T).astype("<u4").view("<u8").astype(np.uint64)


def mix_seeds(*columns) -> np.ndarray:
    """``corruption.mix_seed(*row)`` of each row of the integer ``columns`` (scalars or ``[B]`` arrays) -> ``[B]``
    uint64."""
    rows = [c.tolist() if isinstance(c, np.ndarray) else list(c) if isinstance(c, (list, tuple)) else [c]
            for c in columns]
    cols = [np.asarray([int(x) & ((1 << 64) - 1) for x in r], np.uint64) for r in rows]
    state = np.full(max(len(c) for c in cols), 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            state = (state ^ c) * np.uint64(0xBF58476D1CE4E5B9)
            state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state ^= state >> np.uint64(31)
    return state >> np.uint64(1)


def raw_outputs(seeds: Sequence[int], width: int) -> np.ndarray:
    """``np.random.PCG64(seed).random_raw(width)`` for each seed -> ``[B, width]`` uint64."""
    seeds = np.asarray(seeds, np.uint64)
    out = np.zeros((len(seeds), width), np.uint64)
    if width == 0:
        return out
    pcg = np.random.PCG64(0)                           # one per call: set to each sample's state in turn
    for b, (s_hi, s_lo, i_hi, i_lo) in enumerate(seed_states(seeds).tolist()):
        inc = ((((i_hi << 64) | i_lo) << 1) | 1) & _M128
        state = (((inc + ((s_hi << 64) | s_lo)) & _M128) * _PCG_MULT + inc) & _M128     # PCG64's seeding
        pcg.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0,
                      "uinteger": 0}
        out[b] = pcg.random_raw(width)
    return out
