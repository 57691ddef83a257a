"""Reproducible, resumable training batches.

The shuffle order of epoch ``e`` is a permutation seeded by ``(seed, e)`` alone, so a resumed run
sees the same batches as an uninterrupted one: it rebuilds the epoch's permutation and starts at
batch ``k``. Under torchrun each global batch of ``B`` examples is cut into ``world`` contiguous
slices of ``B / world``; since DDP averages gradients, the processes together take the same step a
single process takes on the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from hawq import HawqError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a run seeded with ``seed`` (distinct per pair)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 0x5EED) % (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def steps_per_epoch(n_examples: int, global_batch: int, drop_last: bool) -> int:
    return n_examples // global_batch if drop_last else -(-n_examples // global_batch)


class EpochBatchSampler(Sampler[list[int]]):
    """This process's index lists for one epoch, starting at global batch ``start_batch``."""

    def __init__(self, n_examples: int, global_batch: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1, drop_last: bool = True) -> None:
        if global_batch % world:
            raise HawqError(f"train.batch_size {global_batch} is not divisible by the {world} processes")
        self.perm = epoch_permutation(n_examples, seed, epoch)
        self.global_batch, self.start_batch = global_batch, start_batch
        self.rank, self.world = rank, world
        self.n_batches = steps_per_epoch(n_examples, global_batch, drop_last or world > 1)

    def __len__(self) -> int:
        return max(self.n_batches - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        local = self.global_batch // self.world
        for b in range(self.start_batch, self.n_batches):
            batch = self.perm[b * self.global_batch:(b + 1) * self.global_batch]
            if self.world > 1:
                batch = batch[self.rank * local:(self.rank + 1) * local]
            yield batch.tolist()


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int,
                      collate_fn: Callable | None = None, *, start_batch: int = 0, rank: int = 0,
                      world: int = 1, drop_last: bool = True, num_workers: int = 0,
                      pin_memory: bool = False) -> DataLoader:
    """The loader of one training epoch: seeded shuffle keyed by ``(seed, epoch)``, resumable at a batch.

    ``batch_size`` is the global batch; each of the ``world`` processes gets ``batch_size / world``.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, start_batch, rank, world, drop_last)
    # An explicit generator keeps the DataLoader from drawing its worker seed from the global RNG,
    # which would make a resumed run's dropout masks differ from an uninterrupted run's.
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ 0xC0FFEE)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      generator=generator, pin_memory=pin_memory)


def is_map_dataset(obj: Any) -> bool:
    return isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__")


def describe_source(source: Any, collate_fn: Callable | None, batch_size: int,
                    num_workers: int) -> tuple[Any, Callable | None, int, int]:
    """Normalise what ``train()`` got into ``(dataset_or_iterable, collate_fn, global_batch, num_workers)``.

    A DataLoader with a plain batch size over a map-style dataset is unwrapped to its dataset, collate
    function, batch size and worker count, so its order can be re-seeded; a map-style Dataset uses
    ``batch_size``; anything else is iterated as is.
    """
    if isinstance(source, DataLoader):
        if source.batch_size is not None and is_map_dataset(source.dataset):
            return source.dataset, source.collate_fn, source.batch_size, max(num_workers, source.num_workers)
        return source, None, batch_size, num_workers
    if is_map_dataset(source):
        return source, collate_fn, batch_size, num_workers
    return source, None, batch_size, num_workers
