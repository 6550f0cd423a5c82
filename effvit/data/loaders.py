"""Batching: unreadable samples taken out of the batch, evaluation's sharding over ranks, the loader.

``skip_collate`` drops ``Unreadable`` items and passes their names on (a batch is then ``(inputs, targets,
skipped_names)``), so the caller can count, report or, under ``strict``, stop with the file's name.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .images import Unreadable


def skip_collate(batch: list):
    """Default collation minus unreadable samples; their names ride along as a third element."""
    good = [b for b in batch if not isinstance(b, Unreadable)]
    bad = [f"{b.name} ({b.error})" for b in batch if isinstance(b, Unreadable)]
    if good:
        inputs, targets = default_collate(good)
    else:
        inputs, targets = torch.empty(0), torch.empty(0, dtype=torch.long)
    return (inputs, targets, bad) if bad else (inputs, targets)


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes items r, r + W, r + 2W, ... with no padding, so every item counts once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    # torch seeds `random` and torch per worker from the loader's base seed; numpy too since 1.9, but
    # make it explicit so RandAugment's numpy draws are reproducible on any version.
    np.random.seed(torch.initial_seed() % 2**32)


def build_loader(dataset: Dataset, batch_size: int, *, sampler: Sampler | None = None, train: bool = False,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 collate_fn=skip_collate) -> DataLoader:
    """A DataLoader; without a sampler, evaluation's sharding over ranks (no padding)."""
    if sampler is None:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory,
                      drop_last=train and len(sampler) >= batch_size,  # no ragged last step, unless tiny
                      collate_fn=collate_fn, worker_init_fn=_seed_worker, persistent_workers=False)
