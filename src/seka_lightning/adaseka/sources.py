"""Triplet sources for AdaSEKA experts (SPEC §5): one DataModule per kind of data an expert is built from.

Each yields the same batches of :class:`Triplet` as :class:`SyntheticQADataModule` (the synthetic-QA expert uses
that module itself), so ``seka fit`` builds any expert with ``positive_only=True``. The irrelevant question of a
triplet is the next record's question (cyclically); positive-only builds never read it.

Sources keep away from evaluation data: CounterFact uses cases with ``case_id >= 10000`` (4500:10000 hold the
dev and test slices); lost in the middle uses the last questions of the oracle file (evaluation takes the first
ones); BiasBios uses the second half of the 1,000 ``_complete`` bios by default (the shared copy has no training
split: PronChange evaluates on that set, so evaluate PronChange on ``:500`` or point ``path`` at other bios).

:class:`HighlightedQADataModule` is different: it yields highlighted prompts (``{"text", "spans"}`` dicts) from
held-out QA pairs, for routing statistics (``seka validate`` with :class:`~seka_lightning.adaseka.selector.AdaSekaSelector`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from seka_lightning.benchmarks.biasbios import CsvSet, read_bios
from seka_lightning.benchmarks.counterfact import read_counterfact_cases
from seka_lightning.benchmarks.records import parse_example_subset, read_json_records, select_subset
from seka_lightning.data.synthetic_qa import TripletBatches
from seka_lightning.data.triplets import Triplet, read_pairs

log = logging.getLogger(__name__)

# BENCHMARKS.md: CounterFact dev = cases 4500:5000, test = 5000:10000; expert data must not touch them.
COUNTERFACT_HELD_OUT = range(4500, 10000)
BiasBiosAnswer = Literal["occupation", "sentence"]


def with_irrelevant_questions(records: Sequence[tuple[str, str, str]]) -> list[Triplet]:
    """``(context, question, answer)`` records -> triplets whose irrelevant question is the next record's."""
    if not records:
        return []
    n = len(records)
    return [Triplet(c, q, a, records[(i + 1) % n][1]) for i, (c, q, a) in enumerate(records)]


def _as_list(batch: list[Triplet]) -> list[Triplet]:
    return batch


class TripletSourceDataModule(L.LightningDataModule):
    """Shared batching for expert sources: per-rank split, mid-epoch resume and a data fingerprint, as
    :class:`SyntheticQADataModule` does. Subclasses implement :meth:`records` and :meth:`source_files`."""

    def __init__(self, *, batch_size: int, max_samples: int | None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        self.batch_size, self.max_samples = batch_size, max_samples
        self.triplets: list[Triplet] = []
        self._skip = 0

    def records(self) -> list[tuple[str, str, str]]:
        """``(context, question, answer)`` with the answer a verbatim span of the context, in a fixed order."""
        raise NotImplementedError

    def source_files(self) -> list[Path]:
        raise NotImplementedError

    def load_triplets(self) -> list[Triplet]:
        """The first ``max_samples`` records as triplets; an empty source is an error."""
        records = self.records()[: self.max_samples]
        if not records:
            raise ValueError(f"{type(self).__name__} found no usable records; check its path and selection")
        return with_irrelevant_questions(records)

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.triplets:
            self.triplets = self.load_triplets()
            log.info("%s: %d triplets", type(self).__name__, len(self.triplets))

    def fingerprint(self) -> str:
        """SHA-256 of the source files and the selection arguments: identifies the data an expert came from."""
        digest = hashlib.sha256()
        for file in self.source_files():
            digest.update(file.read_bytes())
        digest.update(repr(sorted(self.hparams.items())).encode())
        return digest.hexdigest()

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = TripletBatches(
            self.triplets, batch_size=self.batch_size, rank=rank, world_size=world, skip=self._skip
        )
        self._skip = 0
        return DataLoader(dataset, batch_size=None, collate_fn=_as_list)

    def state_dict(self) -> dict[str, int]:
        if self.trainer is None or not self.trainer.training:
            return {}
        return {"batches_consumed": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict.get("batches_consumed", 0))


class CounterFactTripletDataModule(TripletSourceDataModule):
    """CounterFact-style triplets, as the reference's adaptive CounterFact builder forms them:
    context ``"Previously, {old fact}. Currently, {new fact}."``, question ``"{rewrite prompt} ?"``, answer the
    new target."""

    def __init__(
        self,
        path: str = "../shared/data/counterfact",
        *,
        case_ids: str = "10000:",
        batch_size: int = 16,
        max_samples: int | None = 200,
    ) -> None:
        """
        Args:
            path: CounterFact folder (EasyEdit files or ``counterfact.json``) or one file of either layout.
            case_ids: slice of case ids (``start:stop``) to draw from; must avoid 4500:10000 (dev and test).
            batch_size: triplets per forward pass.
            max_samples: use only the first N cases in case_id order (the reference builds from 200); None = all.
        """
        super().__init__(batch_size=batch_size, max_samples=max_samples)
        chosen = parse_example_subset(case_ids)
        if chosen.step not in (None, 1) or (chosen.start or 0) < 0 or (chosen.stop or 0) < 0:
            raise ValueError(f"case_ids {case_ids!r} must be a plain 'start:stop' range of non-negative ids")
        start, stop = chosen.start or 0, chosen.stop
        overlap = stop is None or stop > COUNTERFACT_HELD_OUT.start
        if overlap and start < COUNTERFACT_HELD_OUT.stop:
            raise ValueError(
                f"case_ids {case_ids!r} overlaps cases 4500:10000, the dev and test slices; use e.g. '10000:'"
            )
        self.save_hyperparameters()
        self.path, self._ids = path, (start, stop)

    def source_files(self) -> list[Path]:
        path = Path(self.path)
        return sorted(p for p in path.iterdir() if p.is_file() and ".json" in p.name) if path.is_dir() else [path]

    def records(self) -> list[tuple[str, str, str]]:
        start, stop = self._ids
        out = []
        for case in read_counterfact_cases(self.path):
            if case.case_id < start or (stop is not None and case.case_id >= stop):
                continue
            old = f"{case.rewrite_prompt} {case.target_true}"
            new = f"{case.rewrite_prompt} {case.target_new}"
            out.append((f"Previously, {old}. Currently, {new}.", f"{case.rewrite_prompt} ?", case.target_new))
        return out


class BiasBiosTripletDataModule(TripletSourceDataModule):
    """BiasBios-style triplets: context = a bio, question = its person's occupation, answer = the occupation word
    where it appears verbatim as a word (``occupation``; other bios are skipped) or the bio's first sentence
    (``sentence``, the span the BiasBios benchmark highlights)."""

    def __init__(
        self,
        path: str = "../shared/data/biasbios_subset",
        *,
        csv_set: CsvSet = "complete",
        example_subset: str | None = "500:",
        answer: BiasBiosAnswer = "occupation",
        question: str = "What is the occupation of the person described?",
        batch_size: int = 16,
        max_samples: int | None = 200,
    ) -> None:
        """
        Args:
            path: a folder of Bias-in-Bios CSVs, one CSV, or a JSON-lines file of public records.
            csv_set: which CSVs of a folder (``per_profession``, ``complete``, ``all``); see benchmarks.biasbios.
            example_subset: slice of the bios in load order; the default keeps off PronChange's first 500.
            answer: ``occupation`` (the occupation word, bios without it skipped) or ``sentence`` (first sentence).
            question: the relevant question asked about every bio.
            batch_size: triplets per forward pass.
            max_samples: use only the first N usable bios; None = all.
        """
        super().__init__(batch_size=batch_size, max_samples=max_samples)
        if answer not in ("occupation", "sentence"):
            raise ValueError(f"answer must be 'occupation' or 'sentence', got {answer!r}")
        if not question.strip():
            raise ValueError("question must be a non-empty string")
        self.save_hyperparameters()
        self.path, self.csv_set, self.example_subset = path, csv_set, example_subset
        self.answer, self.question = answer, question

    def source_files(self) -> list[Path]:
        path = Path(self.path)
        return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]

    def records(self) -> list[tuple[str, str, str]]:
        bios = select_subset(read_bios(self.path, csv_set=self.csv_set), self.example_subset, what="bios")
        out = []
        for bio in bios:
            if self.answer == "sentence":
                out.append((bio.text, self.question, bio.text[: bio.first_sentence_end].strip()))
                continue
            match = re.search(rf"\b{re.escape(bio.label)}\b", bio.text, flags=re.IGNORECASE)
            if match:
                out.append((bio.text, self.question, match.group()))
        if len(out) < len(bios):
            log.info("BiasBios source: %d of %d bios name their occupation verbatim", len(out), len(bios))
        return out


class LostInTheMiddleTripletDataModule(TripletSourceDataModule):
    """Lost-in-the-middle-style triplets from NQ-Open oracle records: context = the gold passage
    (``"{title}\\n{text}"``, as the benchmark lays out documents), question = the question, answer = the first
    gold answer found verbatim (case-insensitive) in the passage; records without one are skipped."""

    def __init__(
        self,
        path: str = "../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz",
        *,
        example_subset: str | None = "-500:",
        batch_size: int = 16,
        max_samples: int | None = 200,
    ) -> None:
        """
        Args:
            path: the NQ-Open oracle JSON-lines file (optionally gzipped): question, answers, ctxs.
            example_subset: slice of the records in file order; the default (the last 500) stays clear of the
                evaluation questions, which are the first ones.
            batch_size: triplets per forward pass.
            max_samples: use only the first N usable records; None = all.
        """
        super().__init__(batch_size=batch_size, max_samples=max_samples)
        self.save_hyperparameters()
        self.path, self.example_subset = path, example_subset

    def source_files(self) -> list[Path]:
        return [Path(self.path)]

    def records(self) -> list[tuple[str, str, str]]:
        raw = select_subset(read_json_records(self.path), self.example_subset, what=f"records in {self.path}")
        out = []
        for index, record in enumerate(raw):
            question, passage = record.get("question"), _gold_passage(record)
            answers = record.get("answers")
            if not isinstance(question, str) or passage is None or not isinstance(answers, list):
                raise ValueError(
                    f"{self.path} record {index} of the selection: expected 'question', 'answers' (a list) and "
                    "'ctxs' with a gold passage"
                )
            context = f"{passage.get('title', '')}\n{passage.get('text', '')}".strip()
            found = next(
                (a for a in answers if isinstance(a, str) and a.strip() and a.lower() in context.lower()), None
            )
            if found is None:
                continue
            question = question.strip()
            out.append((context, question if question.endswith("?") else question + "?", found))
        return out


def _gold_passage(record: dict[str, Any]) -> dict[str, Any] | None:
    ctxs = record.get("ctxs")
    if not isinstance(ctxs, list) or not ctxs:
        return None
    return next((c for c in ctxs if isinstance(c, dict) and c.get("isgold")), ctxs[0])


class HighlightedQADataModule(L.LightningDataModule):
    """Highlighted prompts from QA pairs, for routing statistics: ``"Context: {c}\\nQuestion: {q}\\nAnswer:"``
    with the context highlighted; batches are lists of ``{"text", "spans", "answer"}`` dicts."""

    def __init__(
        self,
        path: str = "data/synthetic_qa_heldout.jsonl",
        *,
        batch_size: int = 8,
        max_samples: int | None = 64,
    ) -> None:
        """
        Args:
            path: JSONL of QA pairs (context_1/2, question_1/2, answer_1/2); the held-out file by default.
            batch_size: prompts per batch.
            max_samples: use only the first N pairs (two prompts each); None = all.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.max_samples = path, batch_size, max_samples
        self.examples: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        if not self.examples:
            for pair in read_pairs(self.path, max_samples=self.max_samples):
                for i in ("1", "2"):
                    head = "Context: "
                    context = pair[f"context_{i}"]
                    text = f"{head}{context}\nQuestion: {pair[f'question_{i}']}\nAnswer:"
                    span = (len(head), len(head) + len(context))
                    self.examples.append({"text": text, "spans": [span], "answer": pair[f"answer_{i}"]})

    def _loader(self) -> DataLoader:
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=False, collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def train_dataloader(self) -> DataLoader:
        return self._loader()
