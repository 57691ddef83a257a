"""Fashion-MNIST from its four IDX files (gzipped or not), as the Debian package ships them."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hawq import HawqError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_CLASSES = 10
# Per-pixel statistics of the Fashion-MNIST training set.
MEAN, STD = 0.2860, 0.3530


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise HawqError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in {root}: install the Debian package "
        "dataset-fashion-mnist (make data) or set data.root to the folder with the four IDX files"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic (0, 0, dtype, ndim), big-endian dims, raw data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise HawqError(f"{path}: not an unsigned-byte IDX file (magic {zero:#x}/{dtype_code:#x})")
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as e:
        raise HawqError(f"{path}: unreadable IDX file ({e})") from None
    if data.size != int(np.prod(dims)):
        raise HawqError(f"{path}: truncated IDX file ({data.size} bytes of {int(np.prod(dims))})")
    return data.reshape(dims)


def load_fashion_mnist(root: str | Path, split: str = "train") -> TensorDataset:
    """Images as normalised float tensors (N, 1, 28, 28), labels as int64."""
    root = Path(root)
    if not root.is_dir():
        raise HawqError(
            f"Fashion-MNIST folder not found: {root} (install the Debian package dataset-fashion-mnist "
            "or set data.root)"
        )
    img_stem, lbl_stem = FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lbl_stem))
    if len(images) != len(labels):
        raise HawqError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise HawqError(f"Fashion-MNIST {split}: label {int(labels.max())} is outside 0..{NUM_CLASSES - 1} "
                        f"({_find(root, lbl_stem)})")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzipped when the name ends in .gz): used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fake_fashion_mnist(root: str | Path, n_train: int = 512, n_test: int = 256, seed: int = 0) -> Path:
    """A tiny learnable stand-in with the real file layout: class k draws a bright bar at row 2k+4."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 6, 4:24] = 230
        img_stem, lbl_stem = FILES[split]
        write_idx(root / f"{img_stem}.gz", images)
        write_idx(root / f"{lbl_stem}.gz", labels)
    return root
