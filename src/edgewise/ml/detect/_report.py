"""Pictures of a detector at work: validation images with the boxes it found and the true ones.

Invariant: drawing only; the boxes drawn are the predictions given (x1, y1, x2, y2 in the
image's pixels) at or above `min_score`, and the ground truth in white.
"""

from __future__ import annotations

import io

import numpy as np

from ._data import DetectionDataset
from ._eval import Detections

__all__ = ["detections_png"]

_PALETTE = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255),
            (0, 200, 200), (255, 128, 0), (160, 255, 80), (255, 96, 192), (128, 128, 255))


def detections_png(dataset: DetectionDataset, predictions: list[Detections], *,
                   min_score: float, count: int = 8, columns: int = 4) -> bytes:
    """A grid of the first `count` images: ground truth boxes in white, predictions scoring
    >= `min_score` in their class colour with the class name and score."""
    from PIL import Image, ImageDraw

    n = min(count, len(dataset))
    if n == 0:
        raise ValueError("no images to draw")
    tiles = []
    for image, truth, det in zip(dataset.images[:n], dataset.boxes[:n], predictions[:n],
                                 strict=True):
        tile = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
        draw = ImageDraw.Draw(tile)
        for box in np.asarray(truth).reshape(-1, 4).tolist():
            draw.rectangle(box, outline=(255, 255, 255), width=1)
        for box, score, label in zip(np.asarray(det.boxes).reshape(-1, 4).tolist(),
                                     np.asarray(det.scores).reshape(-1).tolist(),
                                     np.asarray(det.labels).reshape(-1).tolist(), strict=True):
            if score < min_score:
                continue
            colour = _PALETTE[int(label) % len(_PALETTE)]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 2, box[1] + 1),
                      f"{dataset.class_names[int(label)]} {score:.2f}", fill=colour)
        tiles.append(tile)
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * w, (i // cols) * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()
