"""Box-aware augmentation: boxes follow the pixels through flips, zoom (crop or pad) and
shifts; nothing lands outside the image; cut boxes are dropped below the visible share;
colour jitter moves no box."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgewise.ml import MLError
from edgewise.ml.detect import (
    DETECT_AUGMENT_PRESETS,
    DetectAugment,
    DetectConfig,
    augment_detection_batch,
    train_detector,
)
from edgewise.ml.detect._augment import move_boxes

SIZE = 64
GEOMETRY = replace(DETECT_AUGMENT_PRESETS["default"], brightness=0.0, contrast=0.0,
                   saturation=0.0, hue=0.0)


def _squares(n: int, seed: int) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    """n black images, each with one white square (its box is exact by construction)."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 3, SIZE, SIZE)
    boxes, labels = [], []
    for i in range(n):
        side = int(rng.integers(6, 30))
        x1, y1 = (int(v) for v in rng.integers(0, SIZE - side, 2))
        x[i, :, y1:y1 + side, x1:x1 + side] = 1.0
        boxes.append(np.array([[x1, y1, x1 + side, y1 + side]], np.float32))
        labels.append(np.array([i % 3]))
    return x, boxes, labels


def _tight_box(image: torch.Tensor) -> np.ndarray | None:
    """The tight box (pixel edges) of the white square's pixels: above the grey padding
    (0.498) and the black ground."""
    on = (image.min(0).values > 0.6).numpy()
    if not on.any():
        return None
    ys, xs = np.nonzero(on)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_boxes_follow_the_pixels(seed: int) -> None:
    x, boxes, labels = _squares(64, seed)
    gen = torch.Generator().manual_seed(seed)
    out, out_boxes, out_labels = augment_detection_batch(x, boxes, labels, GEOMETRY, gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    kept = dropped = moved = 0
    for i in range(len(x)):
        tight = _tight_box(out[i])
        if len(out_boxes[i]) == 1:
            kept += 1
            assert tight is not None, f"image {i}: a box was kept but no square is in view"
            np.testing.assert_allclose(out_boxes[i][0], tight, atol=1.0,
                                       err_msg=f"image {i}")
            assert out_labels[i].tolist() == labels[i].tolist()
            moved += not np.allclose(out_boxes[i][0], boxes[i][0])
        else:
            dropped += 1
            assert len(out_boxes[i]) == 0 and len(out_labels[i]) == 0
            # Dropped: what is still in view is less than min_visible of the moved square
            # (the zoomed area, estimated from the input side and the pixels' own scale).
            visible = 0 if tight is None else float(
                (tight[2] - tight[0]) * (tight[3] - tight[1]))
            side = boxes[i][0, 2] - boxes[i][0, 0]
            assert visible < GEOMETRY.min_visible * (GEOMETRY.zoom[1] * side + 2) ** 2
    # The draws really zoomed, cropped and shifted (a test of nothing would pass above).
    assert moved > 40 and kept > 40


def test_zoom_out_pads_with_grey_and_zoom_in_crops() -> None:
    x = torch.ones(1, 3, SIZE, SIZE)  # an all-white image: padding shows as grey
    box = [np.array([[0, 0, SIZE, SIZE]], np.float32)]
    lab = [np.array([0])]
    cfg = DetectAugment(zoom_p=1.0, zoom=(0.6, 0.61))
    for seed in range(20):
        out, bb, _ = augment_detection_batch(x, box, lab, cfg,
                                             torch.Generator().manual_seed(seed))
        # the whole image shrinks to 0.6 of the side somewhere in the frame: its box is the
        # white area, the rest (64% of the frame) is grey, the backbone's mean
        np.testing.assert_allclose(bb[0][0], _tight_box(out[0]), atol=1.0)
        grey = (out[0].max(0).values < 0.55) & (out[0].min(0).values > 0.45)
        assert float(grey.float().mean()) > 0.55
    cfg = DetectAugment(zoom_p=1.0, zoom=(1.5, 1.51))
    out, bb, _ = augment_detection_batch(x, box, lab, cfg, torch.Generator().manual_seed(0))
    # zoomed in on a window of the white image: all white, the box clipped to the frame
    assert float(out.min()) > 0.99
    np.testing.assert_allclose(bb[0], [[0, 0, SIZE, SIZE]])


def test_boxes_cut_or_outside_are_dropped_and_the_rest_clipped() -> None:
    boxes = np.array([[10, 10, 30, 30], [50, 10, 60, 20], [0, 40, 20, 60]], np.float32)
    labels = np.array([0, 1, 2])
    # Shift right by 44 px: box 0 goes to 54..74, clipped to 54..64, half in view (kept at
    # min_visible 0.35); box 1 moves fully outside (dropped); box 2 goes to 44..64.
    bb, lab = move_boxes(boxes, labels, flip=False, s=1.0, tx=44.0, ty=0.0, size=(SIZE, SIZE),
                         min_visible=0.35)
    assert lab.tolist() == [0, 2]
    np.testing.assert_allclose(bb, [[54, 10, 64, 30], [44, 40, 64, 60]])
    # With a stricter share, the half-visible box goes too.
    _, lab = move_boxes(boxes, labels, flip=False, s=1.0, tx=44.0, ty=0.0, size=(SIZE, SIZE),
                        min_visible=0.6)
    assert lab.tolist() == [2]
    # Flip, then zoom about the origin: 10..30 -> 34..54 -> 68..108, outside a 64 px image:
    # dropped even at min_visible 0. Flip and shift back into view: exact.
    bb, lab = move_boxes(boxes[:1], labels[:1], flip=True, s=2.0, tx=0.0, ty=-10.0,
                         size=(SIZE, SIZE), min_visible=0.0)
    assert bb.shape == (0, 4) and len(lab) == 0
    bb, lab = move_boxes(boxes[:1], labels[:1], flip=True, s=2.0, tx=-60.0, ty=-10.0,
                         size=(SIZE, SIZE), min_visible=0.0)
    np.testing.assert_allclose(bb, [[8, 10, 48, 50]])
    bb, _ = move_boxes(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), flip=True, s=1.3,
                       tx=3.0, ty=1.0, size=(SIZE, SIZE), min_visible=0.35)
    assert bb.shape == (0, 4)


@pytest.mark.parametrize("seed", range(3))
def test_nothing_outside_the_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes, labels = [], []
    for _ in range(32):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, SIZE - 2, (n, 2))
        wh = rng.uniform(1, SIZE, (n, 2))
        bb = np.concatenate([xy, np.minimum(xy + wh, SIZE)], 1).astype(np.float32)
        boxes.append(bb)
        labels.append(rng.integers(0, 5, n))
    x = torch.rand(32, 3, SIZE, SIZE)
    cfg = replace(DETECT_AUGMENT_PRESETS["default"], zoom=(0.4, 2.5), translate_frac=0.4)
    out, bb, lab = augment_detection_batch(x, boxes, labels, cfg,
                                           torch.Generator().manual_seed(seed))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    for b, la in zip(bb, lab, strict=True):
        assert b.dtype == np.float32 and b.shape == (len(la), 4) and la.dtype == np.int64
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= SIZE).all() and (b[:, 3] <= SIZE).all()
        assert (b[:, 2] - b[:, 0] >= 1).all() and (b[:, 3] - b[:, 1] >= 1).all()


def test_colour_jitter_moves_no_box_and_stays_in_range() -> None:
    x, boxes, labels = _squares(16, 7)
    x[:, 0] = torch.clamp(x[:, 0] + 0.8, max=1.0)  # red ground: hue and saturation matter
    colour = DetectAugment(brightness=0.2, contrast=0.3, saturation=0.5, hue=0.2)
    out, bb, lab = augment_detection_batch(x, boxes, labels, colour,
                                           torch.Generator().manual_seed(0))
    for a, b in zip(bb, boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [la.tolist() for la in lab] == [la.tolist() for la in labels]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - x).abs().mean()) > 0.02
    # Hue rotates the red ground away from pure red in some images.
    ground = out[:, :, -1, -1]
    assert float((ground[:, 1] + ground[:, 2]).max()) > 0.1
    # The same seed gives the same batch.
    again, _, _ = augment_detection_batch(x, boxes, labels, colour,
                                          torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_none_is_the_identity_and_unknown_presets_are_refused(tmp_path) -> None:
    x, boxes, labels = _squares(4, 1)
    out, bb, _ = augment_detection_batch(x, boxes, labels, DETECT_AUGMENT_PRESETS["none"])
    assert torch.equal(out, x) and all(np.array_equal(a, b) for a, b in zip(bb, boxes,
                                                                           strict=True))
    assert DetectConfig(data="", out_dir="").augment == "default"
    with pytest.raises(MLError, match="unknown augmentation 'strong'"):
        train_detector(DetectConfig(data="", out_dir=str(tmp_path / "o"), augment="strong"))
