"""COCO-style detection data: ``root/annotations/instances_<split>.json`` + images in ``root/<split>/``.

Items are ``(image CHW float in [0, 1], {"boxes": xyxy float, "labels": category ids, "image_id", "area",
"crowd_boxes", "crowd_labels", "crowd_area"})``. Crowd annotations (``iscrowd: 1``) are kept apart as
ignore regions for COCO evaluation (a detection on a crowd region is neither TP nor FP), never trained on;
``area`` is the annotation's own area (COCO's area ranges use it, not the box area). Boxes without width
or height are dropped; images without boxes are kept (negatives).
Batches are ``(tuple of images, tuple of targets)``: detection models take lists of any sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hawq import HawqError
from hawq.bitmap import atomic_write_text
from hawq.data import DataBundle
from hawq.data.config import DataConfig


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HawqError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HawqError(f"COCO annotation file {path}: invalid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise HawqError(f"COCO annotation file {path}: missing list '{key}'")
    return data


class CocoDetection(Dataset):
    def __init__(self, image_dir: str | Path, annotation_file: str | Path) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise HawqError(f"COCO image folder not found: {self.image_dir}")
        data = _read_json(Path(annotation_file))
        self.images = sorted(data["images"], key=lambda im: im["id"])
        if not self.images:
            raise HawqError(f"COCO annotation file {annotation_file}: no images")
        self.category_ids = sorted(int(c["id"]) for c in data["categories"])
        known = set(self.category_ids)
        # per image and kind ("" = regular, "crowd_" = ignore region): boxes, labels, areas
        self.anns: dict[int, dict[str, list]] = {
            im["id"]: {f"{k}{f}": [] for k in ("", "crowd_") for f in ("boxes", "labels", "area")}
            for im in self.images}
        for ann in data["annotations"]:
            if ann["image_id"] not in self.anns:
                continue
            if int(ann["category_id"]) not in known:
                raise HawqError(f"COCO annotation {ann.get('id')}: category {ann['category_id']} not in categories")
            x, y, w, h = ann["bbox"]
            if w <= 1e-3 or h <= 1e-3:
                continue
            kind = "crowd_" if ann.get("iscrowd", 0) else ""
            per = self.anns[ann["image_id"]]
            per[f"{kind}boxes"].append([x, y, x + w, y + h])
            per[f"{kind}labels"].append(int(ann["category_id"]))
            per[f"{kind}area"].append(float(ann.get("area", w * h)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        from PIL import Image

        info = self.images[i]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except OSError as e:
            raise HawqError(f"COCO image unreadable: {path} ({e})") from None
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        per = self.anns[info["id"]]
        target = {"image_id": torch.tensor(info["id"], dtype=torch.int64)}
        for kind in ("", "crowd_"):
            target[f"{kind}boxes"] = torch.tensor(per[f"{kind}boxes"], dtype=torch.float32).reshape(-1, 4)
            target[f"{kind}labels"] = torch.tensor(per[f"{kind}labels"], dtype=torch.int64)
            target[f"{kind}area"] = torch.tensor(per[f"{kind}area"], dtype=torch.float32)
        return image, target


def collate_detection(items: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[tuple, tuple]:
    images, targets = zip(*items)
    return tuple(images), tuple(targets)


def build_coco(cfg: DataConfig) -> DataBundle:
    root = Path(cfg.root)
    if not root.is_dir():
        raise HawqError(f"COCO data folder not found: {root} (expected annotations/instances_<split>.json "
                        "and <split>/ image folders)")
    splits = [CocoDetection(root / s, root / "annotations" / f"instances_{s}.json")
              for s in (cfg.train_split, cfg.val_split)]
    # labels are category ids, so the head needs max id + 1 outputs (torchvision's COCO convention: 91)
    num_classes = max(max(ds.category_ids, default=0) for ds in splits) + 1
    return DataBundle(splits[0], splits[1], num_classes, collate_fn=collate_detection,
                      info={"name": "coco", "root": str(root), "category_ids": splits[0].category_ids})


def make_fake_coco(root: str | Path, n_train: int = 4, n_val: int = 2, size: int = 64, classes: int = 2,
                   splits: tuple[str, str] = ("train", "val"), seed: int = 0, crowd: bool = False) -> Path:
    """Tiny COCO-format data: noisy images with 1-2 bright rectangles, category k+1 coloured by k % 3.

    ``crowd``: each image also gets a dim crowd annotation (``iscrowd: 1``) over its top-left quarter.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": f"shape{k + 1}"} for k in range(classes)]
    for split, n in zip(splits, (n_train, n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                k = int(rng.integers(0, classes))
                w, h = (int(v) for v in rng.integers(size // 6, size // 2, size=2))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                img[y : y + h, x : x + w] = 40
                img[y : y + h, x : x + w, k % 3] = 240
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": k + 1,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if crowd:
                q = size // 4
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                    "bbox": [0, 0, q, q], "area": q * q, "iscrowd": 1})
            name = f"{i + 1:06d}.png"
            Image.fromarray(img).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        atomic_write_text(root / "annotations" / f"instances_{split}.json",
                          json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root
