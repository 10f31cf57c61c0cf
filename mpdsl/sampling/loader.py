"""The loader every sampler shares: batches of *units* (seed nodes, clusters, sampler steps) drawn in a
seeded order, split among distributed ranks, sampled in ``torch.utils.data.DataLoader`` workers.

Determinism: batch ``k`` of epoch ``e`` is sampled with the random key ``batch_key(seed, e, k)`` and its
units are chunk ``k`` of the epoch's order (a permutation seeded by ``(seed, e)`` when shuffling), so a
batch is the same whichever rank, worker or process samples it, and whatever ``num_workers`` is.
With ``world_size`` K, rank r yields the global batches r, r + K, r + 2K, ... of each epoch; every rank
yields the same number of batches (``floor(batches / K)``: the last incomplete round is dropped), so
the ranks of a ``DistributedDataParallel`` run take their steps together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.utils.data

from mpdsl.diagnostics import MpdslError
from mpdsl.sampling.batch import MiniBatch

__all__ = ["SampleLoader", "SamplingError", "batch_key", "check_positive_int"]


class SamplingError(MpdslError):
    """Sampler or loader arguments that cannot be used (named in the message)."""


def batch_key(seed: int, epoch: int, batch: int) -> int:
    """The 64-bit random key of global batch ``batch`` of ``epoch`` (what the sampler kernels hash)."""
    state = np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint64)[0]
    return int(state & np.uint64(0x7FFF_FFFF_FFFF_FFFF))


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a SamplingError naming the argument ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SamplingError(f"{name} must be a positive integer, got {value!r}", f"pass {name}=1 or more")
    return int(value)


class _Schedule(torch.utils.data.Sampler):
    """Yields ``(key, units)`` per batch of this rank's share of the epoch (see the module doc)."""

    def __init__(self, units: np.ndarray, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 rank: int, world_size: int):
        self.units, self.batch_size, self.shuffle, self.seed = units, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def global_batches(self) -> int:
        full, rest = divmod(len(self.units), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return self.global_batches() // self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.units
        return self.units[np.random.default_rng([self.seed, epoch]).permutation(len(self.units))]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = self.epoch_order(epoch)
        for k in range(self.rank, len(self) * self.world_size, self.world_size):
            yield batch_key(self.seed, epoch, k), order[k * self.batch_size:(k + 1) * self.batch_size]


class _Batches(torch.utils.data.Dataset):
    """Maps a ``(key, units)`` item of the schedule to its sampled ``MiniBatch``."""

    def __init__(self, sample: Callable[[np.ndarray, int], MiniBatch]):
        self.sample = sample

    def __getitem__(self, item: tuple[int, np.ndarray]) -> MiniBatch:
        key, units = item
        return self.sample(units, key)


def _unchanged(batch: Any) -> Any:  # batch_size=None: one sampled batch per item
    return batch


class SampleLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` of ``MiniBatch`` objects: ``sample(units, key)`` builds the batch of ``units``
    (an int64 array of at most ``batch_size`` units) with random key ``key``. ``shuffle`` permutes the
    units every epoch (seeded by ``seed`` and the epoch); ``rank`` / ``world_size`` select this process's
    share; other keywords (``num_workers``, ``persistent_workers``, ``prefetch_factor``, ...) go to
    ``torch.utils.data.DataLoader``. The epoch advances by one at each iteration; ``set_epoch`` sets it."""

    def __init__(self, units: np.ndarray, batch_size: int, sample: Callable[[np.ndarray, int], MiniBatch], *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, **loader_options: Any):
        batch_size = check_positive_int("batch_size", batch_size)
        world_size = check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise SamplingError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}",
                                "pass the process's rank, e.g. torch.distributed.get_rank()")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SamplingError(f"seed must be a non-negative integer, got {seed!r}", "pass seed=0 or more")
        for reserved in ("batch_size", "sampler", "batch_sampler", "collate_fn", "dataset"):
            if reserved in loader_options:
                raise SamplingError(f"{reserved} is set by the loader itself",
                                    f"drop the {reserved}= argument")
        schedule = _Schedule(np.ascontiguousarray(units, dtype=np.int64), batch_size, bool(shuffle), int(seed),
                             bool(drop_last), int(rank), world_size)
        if world_size > 1 and len(schedule) == 0:
            raise SamplingError(f"{schedule.global_batches()} batches cannot be shared by {world_size} ranks",
                                f"use a batch_size of at most {max(1, len(units) // world_size)}")
        self.schedule = schedule
        super().__init__(_Batches(sample), batch_size=None, sampler=schedule, collate_fn=_unchanged,
                         **loader_options)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration samples (its order and random keys)."""
        self.schedule.epoch = int(epoch)
