"""Data sets by name: each builder returns a :class:`DataBundle` of loaders for the pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from hawq import HawqError, did_you_mean
from hawq.data.config import DataConfig


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int | None
    collate_fn: Callable | None = None
    info: dict[str, Any] | None = None

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
               num_workers: int = 0, drop_last: bool = False) -> DataLoader:
        ds = self.train if split == "train" else self.test
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                          collate_fn=self.collate_fn, drop_last=drop_last)


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.tolist())


def _fashion_mnist(cfg: DataConfig) -> DataBundle:
    from hawq.data.fashion_mnist import load_fashion_mnist

    return DataBundle(load_fashion_mnist(cfg.root, "train"), load_fashion_mnist(cfg.root, "test"), 10,
                      info={"name": "fashion_mnist", "root": cfg.root})


DATASETS: dict[str, Callable[[DataConfig], DataBundle]] = {"fashion_mnist": _fashion_mnist}


def register_dataset(name: str, builder: Callable[[DataConfig], DataBundle]) -> None:
    DATASETS[name] = builder


def build_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Build the named data set and apply the configured subsets (seeded, so runs repeat)."""
    _load_builtin()
    if cfg.name not in DATASETS:
        hint = did_you_mean(cfg.name, DATASETS)
        raise HawqError(f"unknown data set '{cfg.name}'{hint}; known: {', '.join(sorted(DATASETS))}")
    bundle = DATASETS[cfg.name](cfg)
    bundle.train = _subset(bundle.train, cfg.train_subset, seed)
    bundle.test = _subset(bundle.test, cfg.test_subset, seed + 1)
    return bundle


def _load_builtin() -> None:
    from hawq.data import sources  # noqa: F401  (registers the other data sets)
