"""The training samples themselves: image previews of the most harmful and most helpful samples.

A preview function maps ``(dataset, ids)`` to images ``Tensor[N, C, H, W]`` (or ``Tensor[N, H, W]``), or
None when it cannot show those samples. The default, :func:`image_preview`, shows the first element of
each training item when it is an image tensor (``[H, W]`` or ``[C, H, W]`` with 1 or 3 channels), each
image scaled to [0, 1] for display. Token ids and other data need a user function (e.g. decoded text
drawn into an image, or a thumbnail).

:func:`labelled_grid` puts such images into one picture, each enlarged (nearest neighbour, so 8×8 digits
stay sharp) and captioned with its sample id, its training label (:func:`sample_labels`) and its score
(negative = harmful, red; positive = helpful, blue). The captions need Pillow (installed with matplotlib);
without it the grid comes without captions. Nothing here knows Lightning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

PreviewFn = Callable[[Any, Sequence[int]], "torch.Tensor | None"]

#: The keys under which a dict item's label is looked for, in order.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


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


def _as_label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return None if value.dtype == torch.bool or value.is_complex() else int(value)
    return None


def _label_of(item: Any) -> int | None:
    """The integer after the input of a ``(x, y, ...)`` item, or a dict item's ``label``/``target``/``y``."""
    if isinstance(item, Mapping):
        return next((_as_label(item[key]) for key in LABEL_KEYS if key in item), None)
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return _as_label(item[1])
    return None


def sample_labels(dataset: Any, ids: Sequence[int]) -> list[int | None]:
    """The training label of each sample of ``ids``: the element after the input of ``dataset[i]`` when it is an
    integer (or a 0-d integer tensor), a dict item's ``label``/``labels``/``target``/``targets``/``y``; None where
    there is none. An :class:`~lightning_influence.IndexedDataset` is looked through (its ``(x, index)`` items carry
    an index, not a label). Never raises: a dataset that cannot be read gives None for every sample."""
    while getattr(dataset, "_adds_index", False):  # an IndexedDataset (a room above: read by its marker)
        dataset = dataset.dataset
    if dataset is None:
        return [None] * len(ids)
    try:
        return [_label_of(dataset[int(i)]) for i in ids]
    except Exception:  # noqa: BLE001 - a caption must never end a training run
        return [None] * len(ids)


def format_score(score: float) -> str:
    """``-1.23e-04``: a score in 9 characters, its sign always shown."""
    return f"{score:+.2e}"


# Captions: the sign convention of every score in the package (negative = harmful, positive = helpful).
_HARMFUL_RGB = (198, 40, 40)
_HELPFUL_RGB = (21, 101, 192)
_NEUTRAL_RGB = (97, 97, 97)
_TEXT_RGB = (33, 33, 33)
_FONT_SIZE = 12
_LINE = 15  # px per caption line
_PAD = 6  # px between cells and around the grid


@functools.lru_cache(maxsize=1)
def _font() -> Any:
    """Pillow's default font at 12 px (a scalable font from Pillow 10.1 on, the bitmap one before), or None
    without Pillow."""
    try:
        from PIL import ImageFont
    except ImportError:
        return None
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1: no size, a ~11 px bitmap font
        return ImageFont.load_default()


def score_color(score: float) -> tuple[int, int, int]:
    """RGB of a score's caption: red when harmful (< 0), blue when helpful (> 0), grey for 0 or NaN."""
    return _HARMFUL_RGB if score < 0 else _HELPFUL_RGB if score > 0 else _NEUTRAL_RGB


def labelled_grid(
    images: torch.Tensor,
    sample_ids: Sequence[int],
    scores: Sequence[float],
    labels: Sequence[int | None] | None = None,
    title: str | None = None,
    min_side: int = 64,
    columns: int = 4,
) -> torch.Tensor:
    """One picture of ``images: Tensor[N, C, H, W]`` (C = 1 or 3, values in [0, 1]), as ``uint8[3, H', W']``.

    Each image is enlarged by an integer factor, nearest neighbour, until its shorter side is at least
    ``min_side`` pixels (an 8×8 digit becomes 64×64), and set in a white cell of a grid of ``columns`` columns,
    rank 1 top left. Under it: ``id <sample id>``, ``label <label>`` (where ``labels`` has one) and the score
    (:func:`format_score`; red when harmful, blue when helpful); ``title`` above the grid. Without Pillow the grid
    comes without the text. A fraction of a millisecond per image: each character is drawn once, then copied.
    """
    images = images.detach().cpu().float()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    n = images.shape[0]
    if images.dim() != 4 or images.shape[1] not in (1, 3) or n == 0:
        raise ValueError(f"images must be Tensor[N >= 1, 1 or 3, H, W], got {tuple(images.shape)}.")
    if len(sample_ids) != n or len(scores) != n or (labels is not None and len(labels) != n):
        raise ValueError(f"{n} images need {n} sample ids, scores and labels.")
    height, width = images.shape[-2:]
    scale = max(1, math.ceil(min_side / max(1, min(height, width))))
    # numpy, not torch, from here on: repeat_interleave on small tensors costs milliseconds, np.repeat microseconds
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy().transpose(0, 2, 3, 1)  # [N, H, W, C]
    pixels = np.repeat(np.repeat(pixels, scale, axis=1), scale, axis=2)
    side_h, side_w = height * scale, width * scale

    captions = _captions(sample_ids, scores, labels) if _font() is not None else [[] for _ in range(n)]
    # cells as narrow as the images and captions allow: the picture's pixels are most of TensorBoard's cost
    cell_w = max([side_w] + [patch.shape[1] for lines in captions for patch in lines])
    cell_h = side_h + max(len(lines) for lines in captions) * _LINE + _PAD
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    heading = _text_patch(title, _TEXT_RGB) if title and _font() is not None else None
    top = _PAD if heading is None else _PAD + _LINE + _PAD // 2
    canvas_w = max(_PAD + columns * (cell_w + _PAD), 0 if heading is None else heading.shape[1] + 2 * _PAD)
    canvas = np.full((top + rows * cell_h, canvas_w, 3), 255, dtype=np.uint8)
    if heading is not None:
        _paste(canvas, heading, _PAD, _PAD // 2, canvas.shape[1] - _PAD)
    for i in range(n):
        x = _PAD + (i % columns) * (cell_w + _PAD)
        y = top + (i // columns) * cell_h
        left = x + (cell_w - side_w) // 2
        canvas[y : y + side_h, left : left + side_w] = pixels[i]  # a grey image broadcast to RGB
        for line, patch in enumerate(captions[i]):  # centred under the image
            _paste(canvas, patch, x + (cell_w - patch.shape[1]) // 2, y + side_h + 2 + line * _LINE, cell_w)
    return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))


def _captions(
    sample_ids: Sequence[int], scores: Sequence[float], labels: Sequence[int | None] | None
) -> list[list[np.ndarray]]:
    """Each image's caption lines as :func:`_text_patch` pictures: its id, its label (when any image has one) and
    its score, coloured by its sign."""
    if labels is not None and all(label is None for label in labels):
        labels = None
    captions = []
    for i, sample_id in enumerate(sample_ids):
        score = float(scores[i])
        lines = [_text_patch(f"id {int(sample_id)}", _TEXT_RGB)]
        if labels is not None:
            lines.append(_text_patch("label ?" if labels[i] is None else f"label {labels[i]}", _TEXT_RGB))
        lines.append(_text_patch(format_score(score), score_color(score)))
        captions.append(lines)
    return captions


@functools.lru_cache(maxsize=256)
def _glyph(char: str) -> tuple[np.ndarray, int]:
    """``(float32[_LINE, w] coverage in [0, 1], advance in px)`` of one character in :func:`_font`, drawn once: a
    caption is put together from its characters' glyphs (a tenth of the cost of Pillow drawing every caption)."""
    from PIL import Image, ImageDraw

    font = _font()
    advance = max(1, round(font.getlength(char)))
    picture = Image.new("L", (advance + 4, _LINE), 0)
    ImageDraw.Draw(picture).text((0, 0), char, fill=255, font=font)
    return np.asarray(picture, dtype=np.float32) / 255.0, advance


@functools.lru_cache(maxsize=1024)  # ids and labels come back window after window; read only
def _text_patch(text: str, color: tuple[int, int, int]) -> np.ndarray:
    """``uint8[_LINE, w, 3]``: ``text`` in ``color`` on white."""
    glyphs = [_glyph(char) for char in text]
    mask = np.zeros((_LINE, sum(advance for _, advance in glyphs) + 4), dtype=np.float32)
    x = 0
    for coverage, advance in glyphs:
        np.maximum(mask[:, x : x + coverage.shape[1]], coverage, out=mask[:, x : x + coverage.shape[1]])
        x += advance
    alpha = mask[..., None]
    patch = 255.0 * (1.0 - alpha) + np.asarray(color, dtype=np.float32) * alpha
    return patch.round().astype(np.uint8)


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int, width: int) -> None:
    """``patch`` into ``canvas[y:, x:]``, at most ``width`` pixels of it, clipped at the canvas' edges."""
    h, w = min(patch.shape[0], canvas.shape[0] - y), min(patch.shape[1], width, canvas.shape[1] - x)
    if h > 0 and w > 0:
        canvas[y : y + h, x : x + w] = patch[:h, :w]
