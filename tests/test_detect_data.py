"""Detection data: COCO, YOLO and VOC readers on crafted folders, their errors, the split,
the statistics and the synthetic scene generator (on the real Fashion-MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgewise.ml import DatasetError
from edgewise.ml.detect import (
    DetectionDataset,
    SynthConfig,
    detection_split,
    detection_stats,
    load_coco,
    load_detection_dataset,
    load_voc,
    load_yolo,
    synth_scenes,
    write_coco,
    write_synth_coco,
)

NAMES = ("cat", "dog")
# Two images of 40x30 (w x h) with boxes x1, y1, x2, y2 and labels.
BOXES = [np.array([[2, 3, 20, 25], [10, 0, 40, 30]], np.float32), np.array([[0, 0, 8, 6]],
                                                                            np.float32)]
LABELS = [np.array([0, 1]), np.array([1])]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(2)]


def _write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(_images()):
        Image.fromarray(img).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def make_coco(root: Path, *, boxes=BOXES, labels=LABELS, category_offset: int = 1) -> Path:
    files = _write_images(root / "images")
    doc = {"images": [{"id": i + 10, "file_name": f, "width": 40, "height": 30}
                      for i, f in enumerate(files)],
           "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in
                                             enumerate(NAMES)]}
    for i, (bb, lab) in enumerate(zip(boxes, labels, strict=True)):
        for (x1, y1, x2, y2), c in zip(bb.tolist(), lab.tolist(), strict=True):
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": i + 10,
                                       "category_id": c + category_offset,
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def make_yolo(root: Path) -> Path:
    files = _write_images(root / "images")
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    for f, bb, lab in zip(files, BOXES, LABELS, strict=True):
        lines = [f"{c} {(x1 + x2) / 80} {(y1 + y2) / 60} {(x2 - x1) / 40} {(y2 - y1) / 30}"
                 for (x1, y1, x2, y2), c in zip(bb.tolist(), lab.tolist(), strict=True)]
        (root / "labels" / f).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return root


def make_voc(root: Path) -> Path:
    files = _write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    for f, bb, lab in zip(files, BOXES, LABELS, strict=True):
        objs = "".join(
            f"<object><name>{NAMES[c]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax>"
            f"<ymax>{y2:g}</ymax></bndbox></object>"
            for (x1, y1, x2, y2), c in zip(bb.tolist(), lab.tolist(), strict=True))
        (root / "Annotations" / f).with_suffix(".xml").write_text(
            f"<annotation><filename>{f}</filename><size><width>40</width><height>30</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    return root


@pytest.mark.parametrize("make", [make_coco, make_yolo, make_voc], ids=["coco", "yolo", "voc"])
def test_formats_read_the_same(tmp_path: Path, make) -> None:
    ds = load_detection_dataset(make(tmp_path / "ds"))
    assert ds.class_names == NAMES and len(ds) == 2 and ds.num_boxes == 3
    for got, want in zip(ds.images, _images(), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(ds.boxes, BOXES, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert [lab.tolist() for lab in ds.labels] == [lab.tolist() for lab in LABELS]


def test_coco_round_trip(tmp_path: Path) -> None:
    ds = load_coco(make_coco(tmp_path / "a"))
    write_coco(ds, tmp_path / "b")
    back = load_coco(tmp_path / "b")
    assert back.class_names == ds.class_names
    for x, y in zip(back.boxes, ds.boxes, strict=True):
        np.testing.assert_allclose(x, y)
    with pytest.raises(DatasetError, match="not empty"):
        write_coco(ds, tmp_path / "b")


def test_yolo_sub_folders_to_coco(tmp_path: Path) -> None:
    root = make_yolo(tmp_path / "y")
    (root / "images" / "train").mkdir()
    (root / "labels" / "train").mkdir()
    (root / "images" / "im1.png").rename(root / "images" / "train" / "im1.png")
    (root / "labels" / "im1.txt").rename(root / "labels" / "train" / "im1.txt")
    ds = load_yolo(root)
    assert ds.file_names == ("im0.png", "train/im1.png") and ds.num_boxes == 3
    back = load_coco(write_coco(ds, tmp_path / "c"))
    assert back.file_names == ds.file_names
    np.testing.assert_allclose(back.boxes[1], BOXES[1], atol=1e-4)


def test_box_outside_image(tmp_path: Path) -> None:
    bad = [BOXES[0], np.array([[30, 20, 45, 29]], np.float32)]
    with pytest.raises(DatasetError, match=r"im1.png.*outside the 40x30 image"):
        load_coco(make_coco(tmp_path, boxes=bad))


def test_box_without_area(tmp_path: Path) -> None:
    bad = [BOXES[0], np.array([[5, 5, 5, 9]], np.float32)]
    with pytest.raises(DatasetError, match="has no area"):
        load_coco(make_coco(tmp_path, boxes=bad))


def test_unknown_class_coco(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown class .category_id 3"):
        load_coco(make_coco(tmp_path, category_offset=2))


def test_unknown_class_yolo(tmp_path: Path) -> None:
    root = make_yolo(tmp_path)
    (root / "labels" / "im1.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"im1.txt:1: unknown class 2"):
        load_yolo(root)


def test_unknown_class_voc(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    with pytest.raises(DatasetError, match="unknown class 'dog'"):
        load_voc(root, class_names=["cat"])


@pytest.mark.parametrize("make,image", [(make_coco, "images/im1.png"),
                                        (make_voc, "JPEGImages/im1.png")])
def test_missing_image(tmp_path: Path, make, image: str) -> None:
    root = make(tmp_path)
    (root / image).unlink()
    with pytest.raises(DatasetError, match="im1.png: missing image"):
        load_detection_dataset(root)


def test_yolo_label_without_image(tmp_path: Path) -> None:
    root = make_yolo(tmp_path)
    (root / "images" / "im1.png").unlink()
    with pytest.raises(DatasetError, match="im1.txt: missing image"):
        load_yolo(root)


def test_empty_annotations(tmp_path: Path) -> None:
    root = make_coco(tmp_path, boxes=[np.zeros((0, 4))] * 2, labels=[np.zeros(0, int)] * 2)
    with pytest.raises(DatasetError, match="empty annotations"):
        load_coco(root)


def test_size_mismatch(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    doc = json.loads((root / "annotations.json").read_text())
    doc["images"][0]["width"] = 41
    (root / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="says 41x30 but the image is 40x30"):
        load_coco(root)


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a COCO"):
        load_detection_dataset(tmp_path)


def _dataset(labels: list[list[int]]) -> DetectionDataset:
    n = len(labels)
    return DetectionDataset(
        tuple(np.zeros((10, 10, 3), np.uint8) for _ in range(n)),
        tuple(np.tile(np.array([[1, 1, 5, 5]], np.float32), (len(lab), 1)) for lab in labels),
        tuple(np.asarray(lab, np.int64) for lab in labels), ("a", "b", "c"),
        tuple(f"{i}.png" for i in range(n)), "test")


def test_split_keeps_rare_class_in_both() -> None:
    # Class 2 is rare: 4 of 44 images; each image is stratified by its rarest class.
    labels = [[0, 1]] * 20 + [[1]] * 20 + [[0, 2]] * 4
    tr, va = detection_split(_dataset(labels), 0.25, seed=1)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(44))
    assert not set(tr) & set(va)
    assert sum(i >= 40 for i in va) == 1 and sum(i >= 40 for i in tr) == 3
    assert len(va) == 11


def test_stats() -> None:
    ds = _dataset([[0, 0], [2], []])
    stats = detection_stats(ds)
    assert stats["classes"] == {"a": {"boxes": 2, "images": 1}, "b": {"boxes": 0, "images": 0},
                                "c": {"boxes": 1, "images": 1}}
    assert stats["box_size_bins"] == {"small": 3, "medium": 0, "large": 0}
    assert stats["images_without_boxes"] == 1 and stats["box_area_px"]["p50"] == 16


def test_synth_is_deterministic_and_tight(tmp_path: Path) -> None:
    cfg = SynthConfig(scenes=12, size_px=96, seed=3)
    a, b = synth_scenes(cfg), synth_scenes(cfg)
    for x, y in zip(a.images, b.images, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.class_names[0] == "T-shirt/top" and a.num_boxes >= 12
    sides = np.concatenate([np.maximum(bb[:, 2] - bb[:, 0], bb[:, 3] - bb[:, 1])
                            for bb in a.boxes])
    assert sides.min() < 30 and sides.max() > 35  # scale variety
    other = synth_scenes(SynthConfig(scenes=12, size_px=96, seed=4))
    assert not np.array_equal(a.images[0], other.images[0])
    path, _ = write_synth_coco(cfg, tmp_path / "synth")
    doc = json.loads(path.read_text())
    assert doc["info"]["synthetic"] is True and "SYNTHETIC" in doc["info"]["description"]
    back = load_coco(path)
    for x, y in zip(back.boxes, a.boxes, strict=True):
        np.testing.assert_array_equal(x, y)


def test_synth_config_errors_and_boxes_inside() -> None:
    ds = synth_scenes(SynthConfig(scenes=8, size_px=96, max_objects=6, max_occlusion=0.0,
                                  seed=5))
    for bb in ds.boxes:
        assert len(bb) >= 1 and (bb >= 0).all() and (bb <= 96).all()
        assert ((bb[:, 2] > bb[:, 0]) & (bb[:, 3] > bb[:, 1])).all()
    with pytest.raises(DatasetError, match="under 8 px"):
        synth_scenes(SynthConfig(scenes=1, size_px=32, min_object_frac=0.1))
    with pytest.raises(DatasetError, match="max_occlusion"):
        synth_scenes(SynthConfig(scenes=1, max_occlusion=1.0))


def test_cli_synth_and_stats(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgewise.cli import app

    runner = CliRunner()
    out = tmp_path / "synth"
    res = runner.invoke(app, ["detect", "synth", "--out", str(out), "--scenes", "6",
                              "--size", "80"])
    assert res.exit_code == 0, res.output
    assert (out / "annotations.json").is_file() and len(list((out / "images").iterdir())) == 6
    res = runner.invoke(app, ["detect", "synth", "--out", str(out), "--scenes", "6"])
    assert res.exit_code == 1 and "not empty" in res.output
    res = runner.invoke(app, ["detect", "stats", str(out), "--val-fraction", "0.3"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["images"] == 6 and report["split"]["val"]["images"] >= 1


def test_cli_train_refuses_bad_input(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgewise.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["detect", "train", "--data", str(tmp_path / "none"), "--out",
                              str(tmp_path / "run")])
    assert res.exit_code == 1 and "no such file or folder" in res.output
    res = runner.invoke(app, ["detect", "train", "--data", str(tmp_path), "--out",
                              str(tmp_path / "run"), "--time-budget", "soon"])
    assert res.exit_code == 1 and "cannot read duration" in res.output
    assert not (tmp_path / "run").exists()
