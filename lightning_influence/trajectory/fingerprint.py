"""Fingerprints of flat vectors (θ_t, the step gradient) and the checkpoint interval of a trajectory.

A fingerprint is ``size`` random ±1 projections of a flat vector, computed in float64. The signs
come from a counter-based integer hash (no random number generator state), so any process on any
device rebuilds the same signs bit for bit; only the float64 summation order can differ, by a few
ulps. The definition, for element index i (0-based) and row r = 32·g + b (b = 0..31)::

    mix32(x):  x ^= x >> 16;  x = x·0x7FEB352D mod 2³²;  x ^= x >> 15;  x = x·0x846CA68B mod 2³²;  x ^= x >> 16
    key_g    = mix32(seed ^ mix32(g))                      (seed in [0, 2³²))
    sign_r(i) = +1 if bit b of mix32(i ^ key_g) is 1, else −1
    fingerprint_r(v) = Σ_i sign_r(i) · float64(v_i)

Nothing here knows Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_CHECKPOINT_EVERY", "default_checkpoint_every", "fingerprint", "fingerprints_match"]

_MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_BITS = 32  # projection rows drawn from one 32-bit hash

#: the checkpoint interval when the number of training steps is not known in advance
DEFAULT_CHECKPOINT_EVERY = 100


def _mix32_int(x: int) -> int:
    """``mix32`` on a Python int in [0, 2³²)."""
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2³²`` for an int64 ``Tensor[n]`` in [0, 2³²), split in 16-bit halves so nothing overflows int64."""
    low = (x & 0xFFFF) * c
    high = ((x >> 16) * c) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 ``Tensor[n]`` in [0, 2³²); bit-exact on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def _signs_chunk(start: int, stop: int, keys: list[int], size: int, device: torch.device) -> torch.Tensor:
    """``Tensor[size, stop − start]`` int8 of ±1: the signs of elements start..stop−1."""
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    shifts = torch.arange(_BITS, dtype=torch.int64, device=device)
    parts = []
    for g, key in enumerate(keys):
        rows = min(_BITS, size - _BITS * g)
        bits = (_mix32(index ^ key).unsqueeze(0) >> shifts[:rows, None]) & 1  # [rows, c]
        parts.append((bits * 2 - 1).to(torch.int8))
    return torch.cat(parts)


# The signs of the last few (length, seed, size, device) combinations, as int8 (size × p bytes): a recording
# fingerprints θ_t and the gradient of the same length at every step, so the hash runs once per run, not per step.
_SIGN_CACHE: dict[tuple[int, int, int, str], torch.Tensor] = {}
_SIGN_CACHE_BYTES = 1 << 28  # vectors whose signs would take more are hashed chunk by chunk at every call
_SIGN_CACHE_ENTRIES = 4


def _cached_signs(numel: int, seed: int, keys: list[int], size: int, device: torch.device) -> torch.Tensor | None:
    if size * numel > _SIGN_CACHE_BYTES:
        return None
    key = (numel, int(seed), size, str(device))
    signs = _SIGN_CACHE.get(key)
    if signs is None:
        signs = _signs_chunk(0, numel, keys, size, device)
        while len(_SIGN_CACHE) >= _SIGN_CACHE_ENTRIES:
            _SIGN_CACHE.pop(next(iter(_SIGN_CACHE)))
        _SIGN_CACHE[key] = signs
    return signs


def _project_chunk(
    chunk: torch.Tensor, start: int, keys: list[int], size: int, signs: torch.Tensor | None
) -> torch.Tensor:
    """``Tensor[size]`` float64: the projections of ``chunk`` (float64 ``Tensor[c]``, elements start..start+c-1)."""
    stop = start + chunk.numel()
    rows = _signs_chunk(start, stop, keys, size, chunk.device) if signs is None else signs[:, start:stop]
    return rows.to(torch.float64) @ chunk


def fingerprint(vector: torch.Tensor, seed: int, size: int = 4, chunk_size: int | None = None) -> list[float]:
    """``size`` random ±1 projections of a flat vector (module docstring: the exact definition).

    Args:
        vector: ``Tensor[p]`` of any floating dtype and device (flattened; p < 2³²). The work runs on its
            device (MPS, without float64, on the CPU); the signs are integer hashes, identical everywhere.
        seed: in [0, 2³²); the same seed gives the same projections in every process.
        size: number of projections.
        chunk_size: elements per chunk; memory is O(size · chunk_size), never O(size · p). Default: 2¹⁶ on
            the CPU (cache-sized), 2²² on accelerators (fewer kernel launches).

    Returns:
        ``size`` Python floats (float64). They do not depend on ``chunk_size`` or the device beyond float64
        rounding. Cost: the signs (about 25 integer operations per element and row group of 32) are hashed once
        per vector length, seed and device and cached as int8 while they take at most 256 MiB; each call is
        then ``size`` float64 dot products.
    """
    if not 0 <= int(seed) <= _MASK32:
        raise ValueError(f"fingerprint seed must be in [0, 2**32), got {seed}.")
    if chunk_size is None:
        chunk_size = 1 << 16 if vector.device.type in ("cpu", "mps") else 1 << 22
    if size < 1 or chunk_size < 1:
        raise ValueError(f"fingerprint size and chunk_size must be positive, got {size} and {chunk_size}.")
    flat = vector.detach().reshape(-1)
    if flat.numel() > _MASK32:
        raise ValueError(f"fingerprint supports vectors of fewer than 2**32 elements, got {flat.numel()}.")
    if flat.device.type == "mps":
        flat = flat.cpu()
    keys = [_mix32_int(int(seed) ^ _mix32_int(g)) for g in range(math.ceil(size / _BITS))]
    signs = _cached_signs(flat.numel(), seed, keys, size, flat.device)
    total = torch.zeros(size, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk_size):
        chunk = flat[start : start + chunk_size].to(torch.float64)
        total += _project_chunk(chunk, start, keys, size, signs)
    return [float(x) for x in total.cpu().tolist()]


def fingerprints_match(recorded: Sequence[float], replayed: Sequence[float], rtol: float, atol: float = 0.0) -> bool:
    """Whether a replayed fingerprint reproduces the recorded one.

    Rule: same length, all values finite, and ``max_r |recorded_r − replayed_r| ≤ rtol · scale + atol`` with
    ``scale = max(rms(recorded), rms(replayed))``. One projection of v has magnitude ≈ ‖v‖₂, so ``scale`` ≈ ‖v‖₂
    and ``rtol`` bounds ‖Δv‖-sized differences relative to ‖v‖ (a single projection near 0 by chance does
    not make the test stricter). A relative change ε of v moves the projections by ≈ ε · ‖v‖.
    """
    if len(recorded) != len(replayed):
        return False
    if not recorded:
        return True
    a = torch.tensor([float(x) for x in recorded], dtype=torch.float64)
    b = torch.tensor([float(x) for x in replayed], dtype=torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = max(float(a.pow(2).mean().sqrt()), float(b.pow(2).mean().sqrt()))
    return float((a - b).abs().max()) <= rtol * scale + atol


def default_checkpoint_every(expected_steps: int | None) -> int:
    """Checkpoint interval N ≈ √T (⌈√T⌉, at least 1) for a run of ``expected_steps`` = T optimizer steps.

    √T balances the number of checkpoints on disk (T/N) against the states a reverse sweep rebuilds per
    segment (N). When T is unknown (None, or not positive, e.g. an iterable dataset without a length),
    :data:`DEFAULT_CHECKPOINT_EVERY` (100, ≈ √T for T = 10 000).
    """
    if expected_steps is None or int(expected_steps) <= 0:
        return DEFAULT_CHECKPOINT_EVERY
    return math.isqrt(int(expected_steps) - 1) + 1
