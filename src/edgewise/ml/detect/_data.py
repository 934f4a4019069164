"""Detection data sets from local folders: COCO JSON, YOLO txt and Pascal VOC XML.

Invariant: every reader returns a `DetectionDataset` whose every box lies inside its image,
has positive width and height and a label in range; images are uint8 RGB [H, W, 3] that were
actually read from disk (their size checked against what the annotation file declares). A
missing image, a box outside its image (by more than half a pixel of rounding), an unknown
class or a data set without a single box raises `DatasetError` naming the file, never a
silently smaller data set. Images without boxes are kept: they are the detector's negatives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import stratified_split
from ..errors import DatasetError

__all__ = [
    "BOX_SIZE_BINS",
    "DetectionDataset",
    "detection_split",
    "detection_stats",
    "load_coco",
    "load_detection_dataset",
    "load_voc",
    "load_yolo",
    "write_coco",
]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
# Rounding slack for boxes written as floats by other tools; beyond it a box is an error.
_EDGE_TOLERANCE_PX = 0.5
# COCO's small/medium/large split by box area (pixels), the one its AP_S/AP_M/AP_L use.
BOX_SIZE_BINS: tuple[tuple[str, float], ...] = (("small", 32.0 ** 2), ("medium", 96.0 ** 2),
                                                ("large", float("inf")))


@dataclass(frozen=True)
class DetectionDataset:
    """Images (uint8 RGB [H, W, 3], sizes may differ) with per-image boxes float32 [k, 4]
    (x1, y1, x2, y2 in pixels) and labels int64 [k] indexing `class_names`."""

    images: tuple[np.ndarray, ...]
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    class_names: tuple[str, ...]
    file_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        n = len(self.images)
        if not len(self.boxes) == len(self.labels) == len(self.file_names) == n:
            raise DatasetError(f"{self.source}: {n} images, {len(self.boxes)} box sets, "
                               f"{len(self.labels)} label sets, {len(self.file_names)} names")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def subset(self, idx: np.ndarray | list[int]) -> DetectionDataset:
        pick = [int(i) for i in idx]
        return DetectionDataset(tuple(self.images[i] for i in pick),
                                tuple(self.boxes[i] for i in pick),
                                tuple(self.labels[i] for i in pick), self.class_names,
                                tuple(self.file_names[i] for i in pick), self.source)


# ---- checks shared by the readers ---------------------------------------------------------

def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetError(f"{path}: missing image")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: corrupt or unreadable image: {exc}") from exc


def _checked_boxes(boxes: list[list[float]], width: int, height: int, where: str) -> np.ndarray:
    """float32 [k, 4] clipped to the image; errors for boxes outside it or without area."""
    arr = np.asarray(boxes, np.float32).reshape(-1, 4)
    for x1, y1, x2, y2 in arr:
        if not np.all(np.isfinite([x1, y1, x2, y2])):
            raise DatasetError(f"{where}: box {[x1, y1, x2, y2]} is not finite")
        tol = _EDGE_TOLERANCE_PX
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise DatasetError(f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) "
                               f"lies outside the {width}x{height} image")
        if x2 <= x1 or y2 <= y1:
            raise DatasetError(f"{where}: box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) "
                               "has no area")
    arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, width)
    arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, height)
    return arr


def _check_size(image: np.ndarray, width: int, height: int, where: str) -> None:
    if image.shape[:2] != (height, width):
        raise DatasetError(f"{where}: annotation says {width}x{height} but the image is "
                           f"{image.shape[1]}x{image.shape[0]}")


def _finish(images, boxes, labels, names, files, source: str) -> DetectionDataset:
    if not images:
        raise DatasetError(f"{source}: no images")
    ds = DetectionDataset(tuple(images), tuple(boxes), tuple(labels), tuple(names),
                          tuple(files), source)
    if ds.num_boxes == 0:
        raise DatasetError(f"{source}: empty annotations (no boxes in {len(ds)} images)")
    return ds


# ---- COCO -----------------------------------------------------------------------------------

def _coco_json(root: Path) -> Path:
    if root.is_file():
        return root
    for candidate in (root / "annotations.json", root / "instances.json"):
        if candidate.is_file():
            return candidate
    found = sorted(root.glob("*.json")) or sorted((root / "annotations").glob("*.json"))
    if len(found) != 1:
        raise DatasetError(f"{root}: expected one COCO annotations.json, found "
                           f"{[p.name for p in found] or 'none'}")
    return found[0]


def load_coco(path: Path | str, *, image_dir: Path | str | None = None) -> DetectionDataset:
    """Read a COCO detection JSON (a file, or a folder holding `annotations.json`).

    Images are looked up under `image_dir`, by default the JSON's `images/` sibling folder if
    there is one, else the JSON's folder. Classes are the categories in id order; crowd
    annotations are skipped (COCO evaluation ignores them too).
    """
    json_path = _coco_json(Path(path))
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{json_path}: not a readable JSON file: {exc}") from exc
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list)
                                            for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{json_path}: not COCO detection JSON (needs lists 'images', "
                           "'annotations' and 'categories')")
    if image_dir is None:
        image_dir = json_path.parent / "images"
        if not image_dir.is_dir():
            image_dir = json_path.parent
    image_dir = Path(image_dir)
    try:
        cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): i for i, c in enumerate(cats)}
        names = [str(c["name"]) for c in cats]
        by_image: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in doc["images"]}
        for ann in doc["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in by_image:
                raise DatasetError(f"{json_path}: annotation {ann.get('id')} refers to unknown "
                                   f"image id {image_id}")
            if int(ann["category_id"]) not in cat_index:
                raise DatasetError(f"{json_path}: annotation {ann.get('id')} has unknown class "
                                   f"(category_id {ann['category_id']}; known: "
                                   f"{sorted(cat_index)})")
            by_image[image_id].append(ann)
        images, boxes, labels, files = [], [], [], []
        for im in doc["images"]:
            file_name = str(im["file_name"])
            where = f"{json_path} ({file_name})"
            image = _read_image(image_dir / file_name)
            width, height = int(im["width"]), int(im["height"])
            _check_size(image, width, height, where)
            anns = [a for a in by_image[int(im["id"])] if not a.get("iscrowd", 0)]
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in
                    ([float(v) for v in a["bbox"]] for a in anns)]
            images.append(image)
            boxes.append(_checked_boxes(xyxy, width, height, where))
            labels.append(np.asarray([cat_index[int(a["category_id"])] for a in anns], np.int64))
            files.append(file_name)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{json_path}: malformed COCO entry: {exc!r}") from exc
    return _finish(images, boxes, labels, names, files, str(json_path))


def write_coco(dataset: DetectionDataset, out_dir: Path | str, *,
               info: dict[str, Any] | None = None) -> Path:
    """Write `dataset` as OUT/annotations.json + OUT/images/*.png, all or nothing.

    Refuses an existing non-empty `out_dir`; files are written to a temporary sibling folder
    that replaces `out_dir` only when complete.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir} exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        images, anns = [], []
        for i, (image, boxes, labels, name) in enumerate(zip(
                dataset.images, dataset.boxes, dataset.labels, dataset.file_names, strict=True)):
            target = tmp / "images" / name
            target.parent.mkdir(parents=True, exist_ok=True)  # YOLO names keep sub-folders
            Image.fromarray(image).save(target)
            images.append({"id": i + 1, "file_name": name, "width": int(image.shape[1]),
                           "height": int(image.shape[0])})
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
                w, h = x2 - x1, y2 - y1
                anns.append({"id": len(anns) + 1, "image_id": i + 1,
                             "category_id": int(label) + 1, "bbox": [x1, y1, w, h],
                             "area": w * h, "iscrowd": 0})
        doc = {"info": info or {}, "images": images, "annotations": anns,
               "categories": [{"id": i + 1, "name": n}
                              for i, n in enumerate(dataset.class_names)]}
        (tmp / "annotations.json").write_text(json.dumps(doc, indent=1))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "annotations.json"


# ---- YOLO -----------------------------------------------------------------------------------

def _yolo_names(root: Path) -> list[str]:
    classes = root / "classes.txt"
    if classes.is_file():
        return [ln.strip() for ln in classes.read_text().splitlines() if ln.strip()]
    for yaml_path in (root / "data.yaml", root / "dataset.yaml"):
        if yaml_path.is_file():
            try:
                import yaml
            except ImportError as exc:
                raise DatasetError(f"{yaml_path}: reading it needs pyyaml; or write a "
                                   "classes.txt with one class name per line") from exc
            try:
                names = (yaml.safe_load(yaml_path.read_text()) or {}).get("names")
            except (yaml.YAMLError, AttributeError) as exc:
                raise DatasetError(f"{yaml_path}: unreadable: {exc}") from exc
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if not isinstance(names, list) or not names:
                raise DatasetError(f"{yaml_path}: no 'names' list of classes")
            return [str(n) for n in names]
    raise DatasetError(f"{root}: no classes.txt or data.yaml naming the YOLO classes")


def load_yolo(root: Path | str) -> DetectionDataset:
    """Read a YOLO folder: `images/**/x.png` with `labels/**/x.txt` (class cx cy w h, all
    normalised to [0, 1]) and the class names in `classes.txt` or `data.yaml`.

    An image without a label file, or with an empty one, has no objects (YOLO's convention).
    """
    root = Path(root)
    image_root, label_root = root / "images", root / "labels"
    if not image_root.is_dir() or not label_root.is_dir():
        raise DatasetError(f"{root}: a YOLO data set needs images/ and labels/ folders")
    names = _yolo_names(root)
    paths = sorted(p for p in image_root.rglob("*")
                   if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    images, boxes, labels, files = [], [], [], []
    for path in paths:
        rel = path.relative_to(image_root)
        label_path = (label_root / rel).with_suffix(".txt")
        image = _read_image(path)
        height, width = image.shape[:2]
        xyxy, classes = [], []
        lines = label_path.read_text().splitlines() if label_path.is_file() else []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{label_path}:{n}"
            parts = line.split()
            try:
                cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
            except (ValueError, IndexError):
                raise DatasetError(f"{where}: expected 'class cx cy w h', got {line!r}") from None
            if len(parts) != 5:
                raise DatasetError(f"{where}: expected 5 fields (class cx cy w h), got "
                                   f"{len(parts)}")
            if not 0 <= cls < len(names):
                raise DatasetError(f"{where}: unknown class {cls} (classes 0..{len(names) - 1})")
            xyxy.append([(cx - w / 2) * width, (cy - h / 2) * height,
                         (cx + w / 2) * width, (cy + h / 2) * height])
            classes.append(cls)
        images.append(image)
        boxes.append(_checked_boxes(xyxy, width, height, str(label_path)))
        labels.append(np.asarray(classes, np.int64))
        files.append(str(rel))
    orphans = sorted(p for p in label_root.rglob("*.txt")
                     if not any((image_root / p.relative_to(label_root)).with_suffix(s).is_file()
                                for s in _IMAGE_SUFFIXES | {s.upper() for s in _IMAGE_SUFFIXES}))
    if orphans:
        raise DatasetError(f"{orphans[0]}: missing image for this label file "
                           f"({len(orphans)} label file(s) without an image)")
    return _finish(images, boxes, labels, names, files, str(root))


# ---- Pascal VOC -------------------------------------------------------------------------------

def load_voc(root: Path | str, *, class_names: list[str] | tuple[str, ...] | None = None
             ) -> DetectionDataset:
    """Read a Pascal VOC folder: `Annotations/*.xml` naming images in `JPEGImages/`.

    Classes are `class_names` when given (a name outside them is an error), else every name
    found, sorted. `difficult` objects are kept, as VOC's own training does.
    """
    root = Path(root)
    ann_dir, image_dir = root / "Annotations", root / "JPEGImages"
    if not ann_dir.is_dir():
        raise DatasetError(f"{root}: a VOC data set needs an Annotations/ folder")
    if not image_dir.is_dir():
        image_dir = root / "images"
    parsed = []
    for xml_path in sorted(ann_dir.glob("*.xml")):
        try:
            tree = ET.parse(xml_path).getroot()
            file_name = tree.findtext("filename") or xml_path.stem + ".jpg"
            size = tree.find("size")
            width = int(size.findtext("width"))  # type: ignore[union-attr, arg-type]
            height = int(size.findtext("height"))  # type: ignore[union-attr, arg-type]
            objects = []
            for obj in tree.findall("object"):
                bb = obj.find("bndbox")
                coords = [float(bb.findtext(k)) for k in  # type: ignore[union-attr, arg-type]
                          ("xmin", "ymin", "xmax", "ymax")]
                objects.append((str(obj.findtext("name", "")).strip(), coords))
        except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
            raise DatasetError(f"{xml_path}: malformed VOC annotation: {exc}") from exc
        parsed.append((xml_path, file_name, width, height, objects))
    if not parsed:
        raise DatasetError(f"{ann_dir}: no .xml annotation files")
    names = list(class_names) if class_names is not None else sorted(
        {name for *_, objects in parsed for name, _ in objects})
    index = {n: i for i, n in enumerate(names)}
    images, boxes, labels, files = [], [], [], []
    for xml_path, file_name, width, height, objects in parsed:
        image = _read_image(image_dir / file_name)
        _check_size(image, width, height, str(xml_path))
        for name, _ in objects:
            if name not in index:
                raise DatasetError(f"{xml_path}: unknown class {name!r} (known: {names})")
        # VOC pixel coordinates are 1-based and inclusive: (1, 1, W, H) is the whole image.
        xyxy = [[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2) in objects]
        images.append(image)
        boxes.append(_checked_boxes(xyxy, width, height, str(xml_path)))
        labels.append(np.asarray([index[n] for n, _ in objects], np.int64))
        files.append(file_name)
    return _finish(images, boxes, labels, names, files, str(root))


def load_detection_dataset(path: Path | str) -> DetectionDataset:
    """Read whichever of COCO, YOLO or VOC the folder (or COCO .json file) holds."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"detection data set {path}: no such file or folder")
    if path.is_file() or any(path.glob("*.json")) or (path / "annotations").is_dir():
        return load_coco(path)
    if (path / "Annotations").is_dir():
        return load_voc(path)
    if (path / "labels").is_dir():
        return load_yolo(path)
    raise DatasetError(f"{path}: not a COCO (annotations.json), YOLO (images/ + labels/) or "
                       "VOC (Annotations/ + JPEGImages/) data set")


# ---- split and statistics -------------------------------------------------------------------

def _strata(dataset: DetectionDataset) -> np.ndarray:
    """One key per image: its rarest class (so rare classes reach both splits); -1: no boxes."""
    counts = np.bincount(np.concatenate(dataset.labels), minlength=len(dataset.class_names))
    return np.asarray([int(lab[np.argmin(counts[lab])]) if len(lab) else -1
                       for lab in dataset.labels], np.int64)


def detection_split(dataset: DetectionDataset, val_fraction: float,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) image indices, stratified by each image's rarest class.

    A class that is the rarest of only one image cannot be in both splits; that image goes to
    training (validation then lacks the class, which `detection_stats` on the split shows).
    """
    keys = _strata(dataset)
    uniq, counts = np.unique(keys, return_counts=True)
    lone = np.isin(keys, uniq[counts < 2])
    rest = np.flatnonzero(~lone)
    if len(rest) < 2:
        raise DatasetError(f"{dataset.source}: {len(dataset)} image(s) cannot be split into "
                           "training and validation")
    tr, va = stratified_split(keys[rest], val_fraction, seed)
    return np.sort(np.concatenate([rest[tr], np.flatnonzero(lone)])), np.sort(rest[va])


def detection_stats(dataset: DetectionDataset) -> dict[str, Any]:
    """Class and box-size statistics: per class images and boxes, COCO size bins, box
    width/height/area percentiles in pixels, boxes per image, image sizes."""
    labels = np.concatenate(dataset.labels) if dataset.num_boxes else np.zeros(0, np.int64)
    boxes = np.concatenate(dataset.boxes) if dataset.num_boxes else np.zeros((0, 4), np.float32)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h
    bins, lower = {}, 0.0
    for name, upper in BOX_SIZE_BINS:
        bins[name] = int(((area >= lower) & (area < upper)).sum())
        lower = upper

    def pct(v: np.ndarray) -> dict[str, float]:
        if not len(v):
            return {}
        q = np.percentile(v, [0, 5, 50, 95, 100])
        return {k: round(float(x), 2) for k, x in zip(("min", "p5", "p50", "p95", "max"), q,
                                                      strict=True)}

    per_class = {}
    for c, name in enumerate(dataset.class_names):
        per_class[name] = {"boxes": int((labels == c).sum()),
                           "images": int(sum(bool((lab == c).any()) for lab in dataset.labels))}
    per_image = np.asarray([len(b) for b in dataset.boxes])
    sizes = sorted({(int(im.shape[1]), int(im.shape[0])) for im in dataset.images})
    return {"images": len(dataset), "boxes": int(len(labels)),
            "images_without_boxes": int((per_image == 0).sum()),
            "boxes_per_image": {"mean": round(float(per_image.mean()), 2),
                                "max": int(per_image.max())},
            "classes": per_class, "box_size_bins": bins,
            "box_width_px": pct(w), "box_height_px": pct(h), "box_area_px": pct(area),
            "image_sizes": [f"{wd}x{ht}" for wd, ht in sizes[:10]]}
