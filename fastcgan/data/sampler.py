"""The order of the training data: an epoch permutation that a resumed run continues exactly,
and the per-epoch batch stream the trainer reads (a DataLoader, or the GPU image bank)."""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochSampler", "TrainBatches"]


class EpochSampler(Sampler):
    """Indices of one epoch from position ``start`` on: a permutation fixed by (seed, epoch), so a
    resumed run continues mid-epoch with exactly the batches the uninterrupted run would see.

    Distributed (``world > 1``): the epoch is cut into global batches of ``global_batch`` and
    process ``rank`` gets its ``global_batch / world`` consecutive items of each (an incomplete
    last global batch is dropped), i.e. one process's order split across processes."""

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int,
        start: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        global_batch: int = 1,
    ):
        self.n, self.seed, self.epoch, self.start, self.shuffle = n, seed, epoch, start, shuffle
        self.rank, self.world, self.global_batch = rank, world, global_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & 0x7FFF_FFFF_FFFF)
        return torch.randperm(self.n, generator=g)

    def _indices(self) -> torch.Tensor:
        idx = self._order()[self.start :]
        if self.world == 1:
            return idx
        gb, b = self.global_batch, self.global_batch // self.world
        full = (idx.numel() // gb) * gb
        return idx[:full].view(-1, gb)[:, self.rank * b : (self.rank + 1) * b].reshape(-1)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return self._indices().numel()


def _worker_init(_):
    # Ctrl-C reaches the whole process group: only the main process handles it (it finishes the
    # step and checkpoints); a worker dying on it would abort the loader mid-batch instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainBatches:
    """uint8 batches ``{"A", "B"}`` of one epoch from a data position on, for this process.

    ``dataset``: an ``UnalignedDataset`` (read by a DataLoader with ``workers`` processes) or
    ``bank``: a ``DeviceImageBank`` (``--data-on-gpu``: sampled on the device, no loader).
    ``batch_size`` is the global batch; ``shard = (rank, world)`` picks this process's part."""

    def __init__(self, dataset, bank, batch_size: int, seed: int, shuffle: bool, workers: int,
                 shard: tuple[int, int] = (0, 1), pin_memory: bool = False):
        self.ds, self.bank, self.bs, self.seed, self.shuffle = dataset, bank, batch_size, seed, shuffle
        self.workers, self.shard, self.pin_memory = workers, shard, pin_memory

    def __len__(self) -> int:
        """Batches per epoch (an incomplete last batch is dropped)."""
        n = len(self.bank) if self.bank is not None else len(self.ds)
        return n // self.bs

    @property
    def augment_kw(self) -> dict:
        return (self.bank if self.bank is not None else self.ds).batch_augment

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """Random streams of the data path that a checkpoint must hold."""
        return {"bank": self.bank.generator} if self.bank is not None else {}

    def epoch(self, epoch: int, start_batch: int, step: int) -> Iterator[dict]:
        if self.bank is not None:
            for i in range(start_batch, len(self)):
                yield self.bank.sample_batch(self.bs, step + i - start_batch, shard=self.shard)
            return
        rank, world = self.shard
        self.ds.set_epoch(epoch)
        sampler = EpochSampler(len(self.ds), self.seed, epoch, start_batch * self.bs, self.shuffle,
                               rank=rank, world=world, global_batch=self.bs)
        from fastcgan.data.datasets import collate

        loader = DataLoader(
            self.ds,
            batch_size=self.bs // world,
            sampler=sampler,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            drop_last=True,
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run (one more iterator) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_worker_init if self.workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            self.ds.record_skipped(batch)
            yield batch

    @property
    def skipped(self) -> list[str]:
        return list(self.ds.skipped)
