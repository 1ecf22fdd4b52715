"""Fingerprints of flat vectors (θ_t, the step gradient) and the checkpoint interval of a trajectory.

A fingerprint is ``size`` random ±1 projections of a flat vector, computed in float64. The signs
come from a counter-based integer hash (no random number generator state), so any process on any
device rebuilds the same signs bit for bit; only the float64 summation order can differ, by a few
ulps. The definition, for element index i (0-based) and row r = 32·g + b (b = 0..31)::

    mix32(x):  x ^= x >> 16;  x = x·0x7FEB352D mod 2³²;  x ^= x >> 15;  x = x·0x846CA68B mod 2³²;  x ^= x >> 16
    key_g    = mix32(seed ^ mix32(g))                      (seed in [0, 2³²))
    sign_r(i) = +1 if bit b of mix32(i ^ key_g) is 1, else −1
    fingerprint_r(v) = Σ_i sign_r(i) · float64(v_i)

With a ``stride`` s > 1 the fingerprint is that of the elements 0, s, 2s, ... (``v[::s]``, their index i counted in
the sampled vector): a recording samples a long vector's elements (:func:`fingerprint_stride`), which still catches
what the fingerprints are for (another batch, another loss, a changed dataset move every element of the gradient, and
so θ) at a fraction of the pass over all of them.

Nothing here knows Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "FINGERPRINT_ELEMENTS",
    "default_checkpoint_every",
    "fingerprint",
    "fingerprint_spec",
    "fingerprint_stride",
    "fingerprint_tensor",
    "fingerprints_match",
]

_MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_BITS = 32  # projection rows drawn from one 32-bit hash

#: the checkpoint interval when the number of training steps is not known in advance
DEFAULT_CHECKPOINT_EVERY = 100

#: about how many elements of a vector a recording's fingerprint reads (:func:`fingerprint_stride`)
FINGERPRINT_ELEMENTS = 1 << 16


def fingerprint_spec(meta: dict) -> tuple[int, int, int]:
    """``(seed, size, stride)`` of a trajectory's ``meta["fingerprint"]``, as the recording computes its fingerprints
    and the replay checks them (a missing stride, in trajectories recorded before it existed: 1, every element)."""
    spec = meta.get("fingerprint") or {}
    return int(spec.get("seed", 0)), int(spec.get("size", 4)), int(spec.get("stride", 1))


def fingerprint_stride(numel: int, elements: int = FINGERPRINT_ELEMENTS) -> int:
    """The stride s = ⌈numel / elements⌉ (at least 1) whose ``v[::s]`` holds at most ``elements`` of a vector of
    ``numel``: every element of a vector up to ``elements`` long (stride 1), about ``elements`` of a longer one. At
    p = 351 K a recording's two fingerprints per step cost ≈ 1.9 ms of CPU over every element (both, with cold
    caches, ``benchmarks/recording_cost.py``), on the cores training uses."""
    return max(1, -(-int(numel) // int(elements)))


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


def _classes_chunk(start: int, stop: int, keys: list[int], size: int, device: torch.device) -> torch.Tensor:
    """``Tensor[stop − start]`` uint8: element i's signs as one number, Σ_r 2^r · [sign_r(i) = +1] (size ≤ 8)."""
    bits = (_signs_chunk(start, stop, keys, size, device) > 0).to(torch.uint8)  # [size, c]
    weights = torch.tensor([1 << r for r in range(size)], dtype=torch.uint8, device=device)
    return (bits * weights[:, None]).sum(0, dtype=torch.uint8)


# What a recording reuses at every step (it fingerprints θ_t and the gradient, of the same length, at every step), for
# the last few (length, seed, size, device) combinations, so that the hash runs once per run, not per step:
# - on the CPU, for size ≤ 8 (the recording's 4): each element's signs as one uint8 "class" c_i (p bytes). A
#   fingerprint is then the float64 sum of the elements of each class (one sequential pass, ``torch.bincount``) and
#   fingerprint_r = Σ_c sign_r(c) · S_c over the 2^size classes: about 0.4 ms for 351 K elements on one core with
#   cold caches, where a float64 matrix-vector product with the [size, p] signs reads 8 · size · p bytes (0.6 ms)
#   and converting int8 signs chunk by chunk costs 0.7 ms. Sequential, so the same bits on any thread count;
# - elsewhere (accelerators, larger sizes): the signs, as float64 while they take at most _DENSE_SIGNS_BYTES (one
#   matrix-vector product per call), else as int8 (size · p bytes) converted chunk by chunk.
# Nothing is cached beyond _SIGN_CACHE_BYTES: longer vectors are hashed chunk by chunk at every call.
_SIGN_CACHE: dict[tuple[int, int, int, str], torch.Tensor] = {}
_SIGN_CACHE_BYTES = 1 << 28
_DENSE_SIGNS_BYTES = 1 << 26
_SIGN_CACHE_ENTRIES = 4
_CLASS_BITS = 8  # sizes up to this use the classes on the CPU


def _uses_classes(size: int, device: torch.device) -> bool:
    return size <= _CLASS_BITS and device.type == "cpu"


def _cached(numel: int, seed: int, keys: list[int], size: int, device: torch.device) -> torch.Tensor | None:
    """The classes ``Tensor[numel]`` uint8 (:func:`_uses_classes`), or the signs ``Tensor[size, numel]`` (float64 up
    to :data:`_DENSE_SIGNS_BYTES`, else int8); None when they would take more than :data:`_SIGN_CACHE_BYTES`."""
    classes = _uses_classes(size, device)
    if (1 if classes else size) * numel > _SIGN_CACHE_BYTES:
        return None
    key = (numel, int(seed), size, str(device))
    found = _SIGN_CACHE.get(key)
    if found is None:
        if classes:
            found = _classes_chunk(0, numel, keys, size, device)
        else:
            found = _signs_chunk(0, numel, keys, size, device)
            if 8 * size * numel <= _DENSE_SIGNS_BYTES:
                found = found.to(torch.float64)
        while len(_SIGN_CACHE) >= _SIGN_CACHE_ENTRIES:
            _SIGN_CACHE.pop(next(iter(_SIGN_CACHE)))
        _SIGN_CACHE[key] = found
    return found


_CLASS_SIGNS: dict[int, torch.Tensor] = {}


def _class_signs(size: int) -> torch.Tensor:
    """``Tensor[size, 2^size]`` float64 on the CPU: sign_r of class c, +1 where bit r of c is set."""
    signs = _CLASS_SIGNS.get(size)
    if signs is None:
        c = torch.arange(1 << size)
        bits = (c.unsqueeze(0) >> torch.arange(size)[:, None]) & 1
        signs = _CLASS_SIGNS[size] = (bits * 2 - 1).to(torch.float64)
    return signs


def _project_chunk(
    chunk: torch.Tensor, start: int, keys: list[int], size: int, cached: torch.Tensor | None
) -> torch.Tensor:
    """The float64 projections of ``chunk`` (float64 ``Tensor[c]``, elements start..start+c-1): ``Tensor[size]``,
    or with the classes ``Tensor[2^size]``, the sums per class."""
    stop = start + chunk.numel()
    if _uses_classes(size, chunk.device):
        classes = _classes_chunk(start, stop, keys, size, chunk.device) if cached is None else cached[start:stop]
        return torch.bincount(classes, weights=chunk, minlength=1 << size)
    rows = _signs_chunk(start, stop, keys, size, chunk.device) if cached is None else cached[:, start:stop]
    return rows.to(torch.float64) @ chunk


def fingerprint_tensor(
    vector: torch.Tensor, seed: int, size: int = 4, chunk_size: int | None = None, stride: int = 1
) -> torch.Tensor:
    """:func:`fingerprint` as a float64 ``Tensor[size]`` on the vector's device (the CPU for MPS), not yet read
    back: on an accelerator the work is queued and nothing waits for it until the values are read
    (``tensor.tolist()``), which a recording does in its writing thread."""
    if not 0 <= int(seed) <= _MASK32:
        raise ValueError(f"fingerprint seed must be in [0, 2**32), got {seed}.")
    if size < 1 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"fingerprint size and chunk_size must be positive, got {size} and {chunk_size}.")
    if stride < 1:
        raise ValueError(f"fingerprint stride must be a positive integer, got {stride}.")
    flat = vector.detach().reshape(-1)[:: int(stride)]
    if flat.numel() > _MASK32:
        raise ValueError(f"fingerprint supports vectors of fewer than 2**32 elements, got {flat.numel()}.")
    if flat.device.type == "mps":
        flat = flat.cpu()
    keys = [_mix32_int(int(seed) ^ _mix32_int(g)) for g in range(math.ceil(size / _BITS))]
    cached = _cached(flat.numel(), seed, keys, size, flat.device)
    if chunk_size is None:  # cached: the whole vector at once (its float64 copy takes 8 · p bytes)
        chunk_size = max(flat.numel(), 1) if cached is not None else 1 << 16 if flat.device.type == "cpu" else 1 << 22
    classes = _uses_classes(size, flat.device)
    if chunk_size >= flat.numel() > 0:  # one chunk
        total = _project_chunk(flat.to(torch.float64), 0, keys, size, cached)
    else:
        total = torch.zeros(1 << size if classes else size, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), chunk_size):
            chunk = flat[start : start + chunk_size].to(torch.float64)
            total += _project_chunk(chunk, start, keys, size, cached)
    return _class_signs(size) @ total if classes else total


def fingerprint(
    vector: torch.Tensor, seed: int, size: int = 4, chunk_size: int | None = None, stride: int = 1
) -> list[float]:
    """``size`` random ±1 projections of a flat vector (module docstring: the exact definition).

    Args:
        vector: ``Tensor[p]`` of any floating dtype and device (flattened; p < 2³²). The work runs on its
            device (MPS, without float64, on the CPU); the signs are integer hashes, identical everywhere.
        seed: in [0, 2³²); the same seed gives the same projections in every process.
        size: number of projections.
        chunk_size: elements of the vector converted to float64 and projected at a time. Default: the whole
            vector when its signs are cached (below), else 2¹⁶ on the CPU (cache-sized), 2²² on accelerators
            (fewer kernel launches).
        stride: the fingerprint of ``vector[::stride]`` (module docstring; 1: every element).

    Returns:
        ``size`` Python floats (float64). They do not depend on ``chunk_size`` or the device beyond float64
        rounding. Cost: the signs (about 25 integer operations per element and row group of 32) are hashed once
        per vector length, seed and device and cached while they take at most 256 MiB; each call is then one pass
        over the vector in float64: on the CPU, for size ≤ 8, the sums of its elements per sign pattern
        (``torch.bincount``, sequential: the same bits on any number of threads; ≈ 0.4 ms for p = 351 K with cold
        caches), else one matrix-vector product with the signs (float64 while they take ≤ 64 MiB, int8 converted
        chunk by chunk beyond). Longer vectors hash their signs at every call (memory O(size · chunk_size)).
        :func:`fingerprint_tensor` gives the values as a tensor without reading them back.
    """
    return [float(x) for x in fingerprint_tensor(vector, seed, size, chunk_size, stride).cpu().tolist()]


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
