"""The training samples themselves: image previews of the most harmful and most helpful samples.

A preview function maps ``(dataset, ids)`` to images ``Tensor[N, C, H, W]`` (or ``Tensor[N, H, W]``), or
None when it cannot show those samples. The default, :func:`image_preview`, shows the first element of
each training item when it is an image tensor (``[H, W]`` or ``[C, H, W]`` with 1 or 3 channels), each
image scaled to [0, 1] for display. Token ids and other data need a user function (e.g. decoded text
drawn into an image, or a thumbnail). Nothing here knows Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

PreviewFn = Callable[[Any, Sequence[int]], "torch.Tensor | None"]


def _first_tensor(item: Any) -> torch.Tensor | None:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, Mapping):
        item = list(item.values())
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    return None


def _as_image(x: torch.Tensor) -> torch.Tensor | None:
    """``Tensor[C, H, W]`` in [0, 1], or None if ``x`` is no image."""
    if not x.is_floating_point() or x.dim() not in (2, 3) or min(x.shape[-2:]) < 4:
        return None
    image = x.detach().cpu().float().reshape(1, *x.shape) if x.dim() == 2 else x.detach().cpu().float()
    if image.shape[0] not in (1, 3):
        return None
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def image_preview(dataset: Any, ids: Sequence[int]) -> torch.Tensor | None:
    """``Tensor[N, C, H, W]`` of the samples ``ids`` when the training items are images, else None."""
    images: list[torch.Tensor] = []
    for i in ids:
        x = _first_tensor(dataset[int(i)])
        image = None if x is None else _as_image(x)
        if image is None or (images and image.shape != images[0].shape):
            return None
        images.append(image)
    return torch.stack(images) if images else None


def preview_images(preview: PreviewFn | None, dataset: Any, ids: Sequence[int]) -> torch.Tensor | None:
    """The previews of ``ids`` as ``Tensor[N, C, H, W]`` in [0, 1], or None (no function, no dataset, no image).
    A preview never ends a training run: a failing function gives None."""
    if preview is None or dataset is None or not len(ids):
        return None
    try:
        images = preview(dataset, list(ids))
    except Exception:  # noqa: BLE001 - a picture must never end a training run
        return None
    if images is None:
        return None
    images = images.detach().cpu().float()
    return images.unsqueeze(1) if images.dim() == 3 else images
