"""Lost in the middle (multi-document QA, the middle documents highlighted): records, scorer, DataModule.

Reads the NQ-Open oracle file (one gold passage per question), building k-document contexts
from other questions' gold passages as distractors, and the public multi-document files of the
lost-in-the-middle repository (``ctxs`` already holds the k documents; ``isgold`` marks the gold).
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from seka_lightning.benchmarks.base import (
    BenchmarkDataModule,
    BenchmarkScorer,
    Example,
    RecordId,
    decode,
    finite,
    naming_record,
)
from seka_lightning.benchmarks.records import (
    BenchmarkExamples,
    HighlightedExample,
    hub_name,
    read_hub_records,
    read_json_records,
    require_str,
    resolve_split,
    select_subset,
)
from seka_lightning.metrics import MeanScore, SubspanExactMatch, best_subspan_em

Highlight = Literal["middle", "all"]
HIGHLIGHTS: tuple[str, ...] = ("middle", "all")
DEFAULT_NUM_DOCUMENTS = 30
# BENCHMARKS.md gold positions for 30 documents.
GOLD_POSITIONS: tuple[int, ...] = (0, 4, 9, 14, 19, 24, 29)
# Question slices (file order): "test" is the reported slice, "dev" a disjoint one for tuning, at the file's end.
SPLITS: dict[str, str | None] = {"test": "0:300", "dev": "2555:2655", "all": None}
INSTRUCTION = "Directly answer in one short phrase without any other word.\n\nContext:\n"

_NON_WORD = re.compile(r"[\W_]+")
_ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class Passage:
    """One document: a Wikipedia title and passage text."""

    title: str
    text: str


@dataclass(frozen=True)
class _Question:
    index: int
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]
    gold_index: int


def load_lost_in_the_middle(
    path: str | PathLike[str],
    *,
    num_documents: int | None = None,
    gold_position: int | None = None,
    seed: int = 0,
    highlight: Highlight = "middle",
    example_subset: str | None = None,
) -> BenchmarkExamples:
    """Lost-in-the-middle prompts with the gold passage at ``gold_position`` (0-based) of k documents.

    From the oracle file (every record has one passage), k = ``num_documents`` (default 30) and
    ``gold_position`` is required; the k - 1 distractors are other questions' gold passages that
    contain none of this question's answers (:func:`normalize_words`), drawn with a generator
    seeded by ``seed`` and the question's index, so a question's context does not depend on
    ``example_subset``. From a multi-document file both come from the records (``isgold``); if
    given they must match. ``highlight`` is "middle" (:func:`middle_documents`) or "all".
    ``example_subset`` slices the questions in file order.
    """
    if highlight not in HIGHLIGHTS:
        raise ValueError(f"highlight {highlight!r} is not one of {list(HIGHLIGHTS)}")
    if num_documents is not None and num_documents < 1:
        raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    source, questions = _read_questions(path)
    selected = select_subset(questions, example_subset, what=f"questions in {path}")
    counts = {len(question.passages) for question in questions}
    if 1 in counts and len(counts) > 1:
        raise ValueError(
            f"{source} mixes oracle records (one passage) with multi-document records; use one layout per file"
        )
    oracle = counts == {1}
    examples = []
    if oracle:
        k = DEFAULT_NUM_DOCUMENTS if num_documents is None else num_documents
        if gold_position is None:
            raise ValueError(
                f"{source} is an oracle file (one passage per question), so gold_position is required; "
                f"pass 0 <= gold_position < num_documents = {k} (the protocol uses {list(GOLD_POSITIONS)} for 30)"
            )
        if not 0 <= gold_position < k:
            raise ValueError(
                f"gold_position must satisfy 0 <= gold_position < num_documents = {k}, got {gold_position}"
            )
        pool = [question.passages[0] for question in questions]
        pool_normalized = [f" {normalize_words(f'{passage.title} {passage.text}')} " for passage in pool]
        for question in selected:
            distractors = _draw_distractors(question, pool, pool_normalized, count=k - 1, seed=seed, source=source)
            documents = [*distractors[:gold_position], question.passages[0], *distractors[gold_position:]]
            examples.append(_example(question, documents, gold_position, highlight))
    else:
        for question in selected:
            where = f"{source} record {question.index}"
            if num_documents is not None and len(question.passages) != num_documents:
                raise ValueError(
                    f"{where}: has {len(question.passages)} documents, not num_documents = {num_documents}"
                )
            if gold_position is not None and question.gold_index != gold_position:
                raise ValueError(
                    f"{where}: the gold document is at {question.gold_index}, not gold_position = {gold_position}"
                )
            examples.append(_example(question, list(question.passages), question.gold_index, highlight))
    return BenchmarkExamples("lost_in_the_middle", tuple(examples))


def middle_documents(num_documents: int) -> range:
    """The 0-based indices of the highlighted "middle" documents of k: the reference's ``ctxs[4:25]`` of 30.

    BENCHMARKS.md highlights documents 5 through 25 of 30, i.e. the slice 4:25 (four documents
    unhighlighted before, five after). Other k scale both ends by k / 30, rounding halves up:
    ``round(4k / 30) .. round(25k / 30) - 1``; k = 20 gives 3..16, k = 10 gives 1..7.
    """
    start = (8 * num_documents + 30) // 60  # round(4k / 30), halves up, in integers
    stop = (50 * num_documents + 30) // 60  # round(25k / 30)
    return range(start, stop)


def normalize_words(text: str) -> str:
    """Lower-case words without the articles a/an/the, split at any punctuation, joined by single spaces.

    The distractor filter's notion of "contains an answer": whole words, so a one-letter answer
    (NQ-Open has "S") does not match every passage, while punctuation splitting words keeps
    possessives a match ("Shakespeare's" contains "Shakespeare").
    """
    return " ".join(word for word in _NON_WORD.split(text.lower()) if word and word not in _ARTICLES)


def build_prompt(
    question: str, documents: Sequence[Passage], highlighted: Collection[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt for ``documents`` (in order) and the character span of each highlighted document."""
    pieces = [INSTRUCTION]
    offset = len(INSTRUCTION)
    spans = []
    for position, passage in enumerate(documents):
        if position:
            pieces.append("\n\n")
            offset += 2
        document = f"{passage.title}\n{passage.text}"
        if position in highlighted:
            spans.append((offset, offset + len(document)))
        pieces.append(document)
        offset += len(document)
    pieces.append(f"\n\nQuestion: {question}\n\nAnswer:")
    return "".join(pieces), spans


def _example(
    question: _Question, documents: list[Passage], gold_position: int, highlight: Highlight
) -> HighlightedExample:
    k = len(documents)
    highlighted = range(k) if highlight == "all" else middle_documents(k)
    text, spans = build_prompt(question.question, documents, highlighted)
    fields: dict[str, Any] = {
        "question": question.question,
        "answers": question.answers,
        "gold_position": gold_position,
        "num_documents": k,
        "highlighted_documents": tuple(highlighted),
        "gold_inside_highlight": gold_position in highlighted,
        "record_index": question.index,
        "gold_title": documents[gold_position].title,
    }
    uid = f"lost_in_the_middle/{question.index}/k{k}/gold{gold_position}"
    return HighlightedExample(uid, text, tuple(spans), fields)


def _draw_distractors(
    question: _Question,
    pool: list[Passage],
    pool_normalized: list[str],
    *,
    count: int,
    seed: int,
    source: str,
) -> list[Passage]:
    """``count`` distinct pool passages, none the gold one nor containing a gold answer, in draw order.

    ``pool_normalized`` holds each passage's normalised title and text padded with a space at both ends.
    """
    rng = random.Random(f"{seed}/{question.index}")
    # Padding with spaces makes the substring test match whole words only (see normalize_words).
    answers = [f" {answer} " for answer in map(normalize_words, question.answers) if answer]
    chosen: list[Passage] = []
    taken = {question.passages[0]}
    tried: set[int] = set()
    while len(chosen) < count:
        if len(tried) == len(pool):
            raise ValueError(
                f"{source} record {question.index}: only {len(chosen)} of the {count} distractors needed "
                "contain none of its answers; lower num_documents"
            )
        candidate = rng.randrange(len(pool))
        if candidate in tried:
            continue
        tried.add(candidate)
        passage = pool[candidate]
        if passage in taken or any(answer in pool_normalized[candidate] for answer in answers):
            continue
        chosen.append(passage)
        taken.add(passage)
    return chosen


def _read_questions(path: str | PathLike[str]) -> tuple[str, list[_Question]]:
    """The questions of a local file or a ``hub:<name>`` dataset, with the name errors should give the source."""
    name = hub_name(path)
    if name is not None:
        source, records = name, read_hub_records(name)
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"lost-in-the-middle path {path} is not a file; point it at a .jsonl(.gz) file")
        source, records = path.name, read_json_records(path)
    questions = []
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        question = require_str(record, "question", where=where)
        answers = record.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
            raise ValueError(f"{where}: missing field 'answers' (a non-empty list of strings)")
        ctxs = record.get("ctxs")
        if not isinstance(ctxs, list) or not ctxs or not all(isinstance(ctx, dict) for ctx in ctxs):
            raise ValueError(f"{where}: missing field 'ctxs' (a non-empty list of documents)")
        passages = []
        for position, ctx in enumerate(ctxs):
            title = ctx.get("title")
            if not isinstance(title, str):
                raise ValueError(f"{where}: ctxs[{position}] missing field 'title'")
            passages.append(Passage(title, require_str(ctx, "text", where=f"{where} ctxs[{position}]")))
        gold = [position for position, ctx in enumerate(ctxs) if ctx.get("isgold") is True]
        if len(ctxs) > 1 and len(gold) != 1:
            raise ValueError(
                f"{where}: a multi-document record needs exactly one ctx with isgold true, found {len(gold)}"
            )
        questions.append(_Question(index, question, tuple(answers), tuple(passages), gold[0] if gold else 0))
    return source, questions


class LostInTheMiddleScorer(BenchmarkScorer):
    """Best-subspan exact match of a short generated answer: overall, per gold position, and with the gold
    document inside / outside the highlighted documents.

    Record ids are ``q{question index}@pos{gold position}``; each record carries ``exact_match``,
    ``exact_match_pos_<p>`` and one of ``exact_match_inside`` / ``exact_match_outside`` (0/1). A group no
    record falls in (e.g. "outside" when every document is highlighted) is left out of ``compute``.
    """

    benchmark = "lost_in_the_middle"

    def __init__(self, *, positions: Sequence[int], max_new_tokens: int = 60) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.exact_match = SubspanExactMatch(positions=tuple(positions))
        self.inside = MeanScore(allow_empty=True)
        self.outside = MeanScore(allow_empty=True)

    def record_id(self, example: Example) -> RecordId:
        fields = example["fields"]
        return f"q{fields['record_index']}@pos{fields['gold_position']}"

    def score(self, method, model, tokenizer, enc, examples):
        out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        predictions = decode(tokenizer, out)
        records = []
        for example, prediction in zip(examples, predictions, strict=True):
            fields = example["fields"]
            with naming_record(self.benchmark, self.record_id(example)):
                answers = list(fields["answers"])
                correct = float(best_subspan_em(prediction, answers))
            position, inside = fields["gold_position"], bool(fields["gold_inside_highlight"])
            records.append(
                {
                    "id": self.record_id(example),
                    "prediction": prediction,
                    "answers": answers,
                    "gold_position": position,
                    "gold_inside_highlight": inside,
                    "exact_match": correct,
                    "scores": {
                        "exact_match": correct,
                        f"exact_match_pos_{position}": correct,
                        f"exact_match_{'inside' if inside else 'outside'}": correct,
                    },
                }
            )
        self.exact_match.update(predictions, [r["answers"] for r in records], [r["gold_position"] for r in records])
        self.inside.update([r["exact_match"] for r in records if r["gold_inside_highlight"]])
        self.outside.update([r["exact_match"] for r in records if not r["gold_inside_highlight"]])
        return records

    def compute(self):
        result = {
            ("exact_match" if k == "em" else k.replace("em_pos_", "exact_match_pos_")): v
            for k, v in self.exact_match.compute().items()
        }
        result["exact_match_inside"] = self.inside.compute()
        result["exact_match_outside"] = self.outside.compute()
        return finite(result)


class LostInTheMiddleDataModule(BenchmarkDataModule):
    """Lost in the middle: k-document contexts with the gold passage at each requested position (BENCHMARKS.md)."""

    benchmark = "lost_in_the_middle"

    def __init__(
        self,
        path: str = "../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz",
        *,
        num_documents: int = DEFAULT_NUM_DOCUMENTS,
        gold_positions: Sequence[int] = GOLD_POSITIONS,
        highlight: str = "middle",
        seed: int = 0,
        split: str | None = None,
        example_subset: str | None = None,
        max_new_tokens: int = 60,
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            path: the NQ-open oracle file (contexts are built from it) or a multi-document jsonl(.gz).
            num_documents: documents per context (oracle file only; 30 in the protocol).
            gold_positions: where the gold passage goes (one prompt per question and position).
            highlight: ``middle`` (documents 5 through 25 of 30, ``ctxs[4:25]``) or ``all`` documents (a variant).
            seed: distractor sampling seed.
            split: ``test`` (questions 0:300, reported), ``dev`` (2555:2655, for tuning) or ``all``; None with
                no example_subset means test.
            example_subset: a slice of the questions instead of a split, e.g. ``"0:50"``.
            max_new_tokens: answer length (60 in the protocol).
            batch_size: prompts per batch.
        """
        super().__init__(path, batch_size=batch_size)
        self.num_documents, self.gold_positions = num_documents, list(gold_positions)
        self.highlight, self.seed, self.split, self.example_subset = highlight, seed, split, example_subset
        self.max_new_tokens = max_new_tokens
        self.subset = resolve_split(split, example_subset, SPLITS)

    def load(self) -> BenchmarkExamples:
        parts = [
            load_lost_in_the_middle(
                self.path,
                num_documents=self.num_documents,
                gold_position=position,
                seed=self.seed,
                highlight=self.highlight,
                example_subset=self.subset,
            )
            for position in self.gold_positions
        ]
        return BenchmarkExamples(
            self.benchmark,
            tuple(e for part in parts for e in part),
            tuple(uid for part in parts for uid in part.missing_highlight),
        )

    def scorer(self) -> BenchmarkScorer:
        return LostInTheMiddleScorer(positions=self.gold_positions, max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_documents": self.num_documents,
            "gold_positions": self.gold_positions,
            "highlight": self.highlight,
            "seed": self.seed,
            "split": self.split,
            "example_subset": self.example_subset,
            "slice": self.subset,
        }
