"""ImageNet-style folders: ``root/<split>/<class>/<image>`` with the standard ImageNet transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from hawq import HawqError
from hawq.data import DataBundle
from hawq.data.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 0.875  # evaluation: resize the short side to size / 0.875, then center-crop (256 -> 224)


def imagenet_transforms(image_size: int, train: bool):
    """RandomResizedCrop + flip for training; resize + center crop for evaluation; ImageNet normalisation."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(int(round(image_size / RESIZE_RATIO))), T.CenterCrop(image_size), *norm])


def load_image_folder(root: str | Path, split: str, image_size: int, train: bool) -> Dataset:
    """A torchvision ImageFolder over ``root/split`` with clear errors for missing or empty folders."""
    from torchvision.datasets import ImageFolder

    folder = Path(root) / split
    if not Path(root).is_dir():
        raise HawqError(f"image folder data set not found: {root} (expected {root}/{split}/<class>/<images>)")
    if not folder.is_dir():
        raise HawqError(f"image folder data set {root}: split folder '{split}' not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise HawqError(f"image folder {folder}: no class sub-folders (expected {folder}/<class>/<images>)")
    try:
        return ImageFolder(str(folder), transform=imagenet_transforms(image_size, train), allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise HawqError(f"image folder {folder}: {str(e).splitlines()[0]}") from None


def build_imagenet_folder(cfg: DataConfig) -> DataBundle:
    size = cfg.image_size or 224
    train = load_image_folder(cfg.root, cfg.train_split, size, train=True)
    test = load_image_folder(cfg.root, cfg.val_split, size, train=False)
    for name, ds in ((cfg.train_split, train), (cfg.val_split, test)):
        if len(ds) == 0:
            from torchvision.datasets.folder import IMG_EXTENSIONS

            raise HawqError(f"image folder {Path(cfg.root) / name}: no images (extensions {', '.join(IMG_EXTENSIONS)})")
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise HawqError(f"image folder {cfg.root}: '{cfg.train_split}' and '{cfg.val_split}' have different "
                        f"classes (e.g. {', '.join(only[:3])})")
    return DataBundle(train, test, len(train.classes),
                      info={"name": "imagenet_folder", "root": str(cfg.root), "classes": list(train.classes),
                            "image_size": size})


def make_fake_image_folder(root: str | Path, classes: int = 3, per_class: int = 4, size: int = 32,
                           splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Path:
    """Tiny learnable stand-in with the ImageNet folder layout: class k is a noisy image whose
    dominant colour channel is k % 3 and which has a bright square at a class-dependent position."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        for k in range(classes):
            d = root / split / f"class_{k:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
                img[..., k % 3] += 100
                q = size // 4
                y0 = (k * q) % (size - q)
                img[y0 : y0 + q, q : 2 * q] = 250
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root
