"""Training samplers: shuffled per epoch from (seed, epoch) alone, sharded over ranks."""

from __future__ import annotations

from collections.abc import Iterator

from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .distributed import DistContext


class EpochSampler(Sampler[int]):
    """Wraps the epoch-seeded training sampler: keeps a fraction of each epoch."""

    def __init__(self, sampler: Sampler, fraction: float = 1.0):
        self.sampler = sampler
        self.fraction = fraction
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(1, int(len(self.sampler) * self.fraction))

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[: len(self)])


def build_train_sampler(dataset: Dataset, ctx: DistContext, seed: int, repeated_aug: int = 1,
                        fraction: float = 1.0) -> EpochSampler:
    """Shuffled per epoch from (seed, epoch) alone, so a resumed run draws the same order; sharded over
    ranks; with ``repeated_aug`` > 1 timm's RepeatAugSampler (DeiT) spreads copies over ranks."""
    if repeated_aug > 1:
        base: Sampler = RepeatAugSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         num_repeats=repeated_aug)
    else:
        base = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                  seed=seed)
    return EpochSampler(base, fraction)
