"""SyntheticQADataModule: building triplets from synthetic QA pairs (``seka fit``) and highlighted held-out
questions (``seka validate``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Generic, NamedTuple, TypeVar

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset

from seka_lightning.data.triplets import (
    Triplet,
    check_length_window,
    check_pairs,
    iter_bucketed,
    iter_pairs,
    iter_triplets,
)
from seka_lightning.resources import resolve_data_path

Item = TypeVar("Item")


class RankBatches(IterableDataset, Generic[Item]):
    """This rank's share of the batches: global batch ``i`` goes to rank ``i % world_size``.

    Every rank yields the same number of batches (the last ones may be empty lists), so ranks stay in step and
    no item is counted twice, which a padding ``DistributedSampler`` would do.
    """

    def __init__(
        self, items: Sequence[Item], *, batch_size: int, rank: int = 0, world_size: int = 1, skip: int = 0
    ) -> None:
        """``skip``: batches this rank already processed before a resume."""
        self.batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.world_size)

    def __iter__(self) -> Iterator[list[Item]]:
        for step in range(self.skip, len(self)):
            index = step * self.world_size + self.rank
            yield self.batches[index] if index < len(self.batches) else []


TripletBatches = RankBatches  # the name `seka fit` started with


class HighlightedQuestion(NamedTuple):
    """A held-out probe: a prompt with two contexts and a question, the character span of the context that
    answers it (the highlight), and the answer."""

    prompt: str
    span: tuple[int, int]
    answer: str


def highlighted_questions(pair: dict) -> list[HighlightedQuestion]:
    """Four probes per QA pair: each question, with its own context highlighted, first and then second.

    The prompt is ``"Context: {c_a} {c_b}\\nQuestion: {q}\\nAnswer:"``; the other pair's context is the distractor.
    """
    probes = []
    for context, question, answer, other in (
        (pair["context_1"], pair["question_1"], pair["answer_1"], pair["context_2"]),
        (pair["context_2"], pair["question_2"], pair["answer_2"], pair["context_1"]),
    ):
        for first in (True, False):
            head = "Context: " if first else f"Context: {other} "
            tail = f" {other}" if first else ""
            start = len(head)
            prompt = f"{head}{context}{tail}\nQuestion: {question}\nAnswer:"
            probes.append(HighlightedQuestion(prompt, (start, start + len(context)), answer))
    return probes


def _as_list(batch: list[Item]) -> list[Item]:
    return batch


class SyntheticQADataModule(L.LightningDataModule):
    """Triplets ``(context, relevant question, answer, irrelevant question)`` from synthetic QA pairs (SPEC §3)
    for building, and :class:`HighlightedQuestion` probes from a held-out file for validating a bank."""

    def __init__(
        self,
        path: str = "data/synthetic_qa.jsonl",
        *,
        batch_size: int = 16,
        max_samples: int | None = None,
        val_path: str | None = "data/synthetic_qa_heldout.jsonl",
        val_max_samples: int | None = None,
        length_window: int | None = None,
    ) -> None:
        """
        Args:
            path: JSONL of QA pairs with context_1/2, question_1/2, answer_1/2 (a relative path missing in the
                working directory reads the shipped file of that name, see ``seka_lightning.resources``).
            batch_size: triplets per forward pass when building (each pass runs the three texts of every
                triplet); prompts per batch when validating.
            max_samples: use only the first N pairs (as the reference's ``--max_samples``); None = all.
            val_path: held-out JSONL of QA pairs for ``seka validate`` (four probes per pair); None = no validation.
            val_max_samples: use only the first N held-out pairs; None = all.
            length_window: when building, sort each run of ``length_window x batch_size`` triplets by text length
                before batching, so a pass pads less (see ``iter_bucketed``); None = the file's order. The sums are
                then added in another order: equal up to float64 rounding for a float64 model, while in bf16 a key
                may round differently in another batch shape, so the bank can differ in its last bits.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("max_samples", max_samples), ("val_max_samples", val_max_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        check_length_window(length_window)
        self.length_window = length_window
        self.path, self.batch_size, self.max_samples = path, batch_size, max_samples
        self.val_path, self.val_max_samples = val_path, val_max_samples
        self.triplets: list[Triplet] = []
        self.val_questions: list[HighlightedQuestion] = []
        self._skip = 0
        self._resume_world_size: int | None = None

    def prepare_data(self) -> None:
        # check the file the running stage reads, so validating needs no training file
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.VALIDATING:
            check_pairs(self._val_path(), max_samples=self.val_max_samples)
        else:
            check_pairs(self.path, max_samples=self.max_samples)

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.triplets:
            triplets = iter_triplets(iter_pairs(self.path, max_samples=self.max_samples))
            self.triplets = list(iter_bucketed(triplets, batch_size=self.batch_size, window=self.length_window))
        if stage == "validate" and not self.val_questions:
            pairs = iter_pairs(self._val_path(), max_samples=self.val_max_samples)
            self.val_questions = [probe for pair in pairs for probe in highlighted_questions(pair)]

    def _val_path(self) -> str:
        if self.val_path is None:
            raise ValueError(
                "data.val_path is None; set it to a held-out QA JSONL (e.g. data/synthetic_qa_heldout.jsonl)"
            )
        return self.val_path

    def fingerprint(self) -> str:
        """SHA-256 of the data file plus ``max_samples``: identifies the data a bank was built from (the same for the
        shipped file and a copy of it)."""
        digest = hashlib.sha256(resolve_data_path(self.path).read_bytes())
        digest.update(f"max_samples={self.max_samples}".encode())
        return digest.hexdigest()

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        if self._skip and self._resume_world_size not in (None, world):
            raise ValueError(
                f"the checkpoint was written by a build on {self._resume_world_size} device(s) but this run has {world}; "
                f"resume with --trainer.devices {self._resume_world_size} (batches are dealt to ranks by device count)"
            )
        dataset = RankBatches(self.triplets, batch_size=self.batch_size, rank=rank, world_size=world, skip=self._skip)
        self._skip = 0
        return DataLoader(dataset, batch_size=None, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        """Batches of :class:`HighlightedQuestion`, split across ranks without repeats (DDP-exact metrics)."""
        rank, world = self._rank()
        dataset = RankBatches(self.val_questions, batch_size=self.batch_size, rank=rank, world_size=world)
        return DataLoader(dataset, batch_size=None, collate_fn=_as_list)

    def state_dict(self) -> dict[str, int]:
        # Lightning resumes mid-epoch by running only the batches it has not processed; the loader must start there.
        if self.trainer is None or not self.trainer.training:
            return {}
        return {
            "batches_consumed": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "world_size": self.trainer.world_size,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict.get("batches_consumed", 0))
        self._resume_world_size = state_dict.get("world_size")
