"""The layout of the tracked parameters in one flat vector ``Tensor[p]``: which parameters, in which order, and which
slice each optimizer param group owns. Nothing here knows Lightning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class FlatParameters:
    """Layout of the tracked parameters in one flat vector of length ``numel``.

    ``names[i]`` occupies ``[offsets[i], offsets[i] + numels[i])``, reshaped to ``shapes[i]``.
    Parameters are ordered by optimizer param group, so each group owns one contiguous slice
    (``group_slices[g]``; an empty slice for a group with no tracked parameter).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    group_slices: tuple[slice, ...]

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.shapes[-1].numel() if self.names else 0

    @classmethod
    def from_groups(cls, named_groups: Sequence[Sequence[tuple[str, torch.Tensor]]]) -> FlatParameters:
        names, shapes, offsets, slices, offset = [], [], [], [], 0
        for group in named_groups:
            start = offset
            for name, tensor in group:
                names.append(name)
                shapes.append(tensor.shape)
                offsets.append(offset)
                offset += tensor.numel()
            slices.append(slice(start, offset))
        return cls(tuple(names), tuple(shapes), tuple(offsets), tuple(slices))

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors given in ``names`` order into a flat ``Tensor[numel]``."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat ``Tensor[numel]`` as ``{name: Tensor[shape]}`` (differentiable).

        One ``split``, not a slice per parameter: a slice's backward writes its gradient into a zero-filled
        ``Tensor[numel]`` and the slices' gradients are then summed (per parameter, a full-size fill and add,
        and under ``vmap`` a full ``[c, numel]`` one), while ``split``'s backward concatenates them once."""
        parts = flat.split([shape.numel() for shape in self.shapes])
        return {name: part.view(shape) for name, shape, part in zip(self.names, self.shapes, parts)}
