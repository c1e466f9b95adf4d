"""SyntheticQADataModule: batches of building triplets from a JSONL of synthetic QA pairs."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from seka_lightning.data.triplets import Triplet, iter_triplets, read_pairs


class TripletBatches(IterableDataset):
    """This rank's share of the triplet batches: global batch ``i`` goes to rank ``i % world_size``.

    Every rank yields the same number of batches (the last ones may be empty lists), so ranks stay in step and
    no triplet is counted twice, which a padding ``DistributedSampler`` would do.
    """

    def __init__(
        self, triplets: list[Triplet], *, batch_size: int, rank: int = 0, world_size: int = 1, skip: int = 0
    ) -> None:
        """``skip``: batches this rank already processed before a resume."""
        self.batches = [triplets[i : i + batch_size] for i in range(0, len(triplets), batch_size)]
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.world_size)

    def __iter__(self) -> Iterator[list[Triplet]]:
        for step in range(self.skip, len(self)):
            index = step * self.world_size + self.rank
            yield self.batches[index] if index < len(self.batches) else []


def _as_list(batch: list[Triplet]) -> list[Triplet]:
    return batch


class SyntheticQADataModule(L.LightningDataModule):
    """Triplets ``(context, relevant question, answer, irrelevant question)`` from synthetic QA pairs (SPEC §3)."""

    def __init__(
        self,
        path: str = "data/synthetic_qa.jsonl",
        *,
        batch_size: int = 16,
        max_samples: int | None = None,
    ) -> None:
        """
        Args:
            path: JSONL of QA pairs with context_1/2, question_1/2, answer_1/2.
            batch_size: triplets per forward pass (each pass runs the three texts of every triplet).
            max_samples: use only the first N pairs (as the reference's ``--max_samples``); None = all.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.path, self.batch_size, self.max_samples = path, batch_size, max_samples
        self.triplets: list[Triplet] = []
        self._skip = 0

    def prepare_data(self) -> None:
        read_pairs(self.path, max_samples=self.max_samples)

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.triplets:
            self.triplets = list(iter_triplets(read_pairs(self.path, max_samples=self.max_samples)))

    def fingerprint(self) -> str:
        """SHA-256 of the data file plus ``max_samples``: identifies the data a bank was built from."""
        digest = hashlib.sha256(Path(self.path).read_bytes())
        digest.update(f"max_samples={self.max_samples}".encode())
        return digest.hexdigest()

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = TripletBatches(
            self.triplets, batch_size=self.batch_size, rank=rank, world_size=world, skip=self._skip
        )
        self._skip = 0
        return DataLoader(dataset, batch_size=None, collate_fn=_as_list)

    def state_dict(self) -> dict[str, int]:
        # Lightning resumes mid-epoch by running only the batches it has not processed; the loader must start there.
        if self.trainer is None or not self.trainer.training:
            return {}
        return {"batches_consumed": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict.get("batches_consumed", 0))
