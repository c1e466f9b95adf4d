"""PronChange (rewrite a biography with "they" pronouns, the instruction highlighted): records, scorer, DataModule.

Uses the same bios as BiasBios (see ``biasbios.py`` for the accepted layouts). By default it
takes the shared folder's ``_complete`` CSV: its 1,000 bios are the ones the folder's
``df_masked_pronoun`` file gives with pronouns replaced by "they", i.e. the PronChange set.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

from seka_lightning.benchmarks.base import (
    BenchmarkDataModule,
    BenchmarkScorer,
    Example,
    RecordId,
    decode,
    naming_record,
)
from seka_lightning.benchmarks.biasbios import CsvSet, read_bios
from seka_lightning.benchmarks.records import BenchmarkExamples, HighlightedExample, resolve_split, select_subset
from seka_lightning.metrics import (
    MeanScore,
    PronounChangeScore,
    has_subject_pronoun,
    is_degenerate,
    pronoun_change,
    strip_echo,
)

# The instruction names the person mid-sentence, so the stand-in is lower-case.
DEFAULT_NAME = "the person"
# Bio slices (load order) of the default 1,000-bio set: "test" is reported, "dev" is a disjoint tuning slice.
SPLITS: dict[str, str | None] = {"test": "0:900", "dev": "900:1000", "all": None}
INSTRUCTION = (
    "For the aforementioned text, substitute 'she' and 'he' with 'they' and generate the occupation "
    "of {name} after changing pronouns:"
)


def load_pronchange(
    path: str | PathLike[str],
    *,
    name: str = DEFAULT_NAME,
    csv_set: CsvSet = "complete",
    example_subset: str | None = None,
) -> BenchmarkExamples:
    """PronChange prompts: ``bio + "\\n" + instruction + "\\n"``, the instruction line highlighted.

    ``name`` stands in for the person where the source has no name; records with a name use it.
    ``csv_set`` picks the CSVs of a folder and ``example_subset`` slices the bios in load order.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string (the stand-in for the person), got {name!r}")
    bios = select_subset(read_bios(path, csv_set=csv_set), example_subset, what=f"bios in {path}")
    examples = []
    for bio in bios:
        person = bio.name or name
        instruction = INSTRUCTION.format(name=person)
        # BENCHMARKS.md: prompt = bio + "\n" + instruction + "\n"; the instruction line is the highlight.
        text = bio.text + "\n" + instruction + "\n"
        start = len(bio.text) + 1
        fields = {
            "bio": bio.text,
            "bio_uid": bio.uid,
            "instruction": instruction,
            "name": person,
            "gender": bio.gender,
            "label": bio.label,
        }
        examples.append(HighlightedExample(f"pronchange/{bio.uid}", text, ((start, start + len(instruction)),), fields))
    return BenchmarkExamples("pronchange", tuple(examples))


class PronChangeScorer(BenchmarkScorer):
    """Pronoun-change P/A scores (fraction of samples with score > 0, and the mean) of a generation, scored after
    removing any echoed copy of the instruction, and the degeneracy rate of the raw generations.

    Record ids are the bio's ``<file stem>/<row>``; each record carries ``pron_score_p/a`` (score > 0, as 0/1),
    ``pron_mean_p/a`` (the score) and ``degenerate`` (0/1, :func:`~seka_lightning.metrics.is_degenerate`).
    """

    benchmark = "pronchange"

    def __init__(self, *, max_new_tokens: int = 256) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.pronouns = PronounChangeScore()
        self.degenerate = MeanScore()

    def record_id(self, example: Example) -> RecordId:
        return example["fields"]["bio_uid"]

    def score(self, method, model, tokenizer, enc, examples):
        out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        generations = decode(tokenizer, out)
        originals, scored, records = [], [], []
        for example, generation in zip(examples, generations, strict=True):
            fields = example["fields"]
            with naming_record(self.benchmark, self.record_id(example)):
                text = strip_echo(generation, fields["instruction"])
                change = pronoun_change(fields["bio"], text)
            degenerate = float(is_degenerate(generation))
            originals.append(fields["bio"])
            scored.append(text)
            records.append(
                {
                    "id": self.record_id(example),
                    "generation": generation,
                    "echo_removed": text != generation,
                    "has_she_he": has_subject_pronoun(fields["bio"]),
                    "p": change.p,
                    "a": change.a,
                    "scores": {
                        "pron_score_p": float(change.p > 0),
                        "pron_score_a": float(change.a > 0),
                        "pron_mean_p": change.p,
                        "pron_mean_a": change.a,
                        "degenerate": degenerate,
                    },
                }
            )
        self.pronouns.update(originals, scored)
        self.degenerate.update([record["scores"]["degenerate"] for record in records])
        return records

    def compute(self):
        result = self.pronouns.compute()
        return {
            "pron_score_p": float(result["p_score"]),
            "pron_score_a": float(result["a_score"]),
            "pron_mean_p": float(result["p_mean"]),
            "pron_mean_a": float(result["a_mean"]),
            "degenerate": float(self.degenerate.compute()),
        }


class PronChangeDataModule(BenchmarkDataModule):
    """PronChange: bios with the pronoun-substitution instruction highlighted (BENCHMARKS.md)."""

    benchmark = "pronchange"

    def __init__(
        self,
        path: str = "../shared/data/biasbios_subset",
        *,
        csv_set: str = "complete",
        split: str | None = None,
        example_subset: str | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 16,
    ) -> None:
        """
        Args:
            path: folder of Bias-in-Bios CSVs or a JSONL of records.
            csv_set: which shared CSVs to use (``complete`` = the 1,000 accountant bios).
            split: ``test`` (bios 0:900, reported), ``dev`` (900:1000, for tuning) or ``all``; None with no
                example_subset means test.
            example_subset: a slice of the bios instead of a split, e.g. ``"0:100"``.
            max_new_tokens: generation length (256 in the protocol).
            batch_size: prompts per batch.
        """
        super().__init__(path, batch_size=batch_size)
        self.csv_set, self.split, self.example_subset = csv_set, split, example_subset
        self.max_new_tokens = max_new_tokens
        self.subset = resolve_split(split, example_subset, SPLITS)

    def load(self) -> BenchmarkExamples:
        return load_pronchange(self.path, csv_set=self.csv_set, example_subset=self.subset)

    def scorer(self) -> BenchmarkScorer:
        return PronChangeScorer(max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "csv_set": self.csv_set,
            "split": self.split,
            "example_subset": self.example_subset,
            "slice": self.subset,
        }

    def counts(self) -> dict[str, int]:
        """Adds ``bios_without_she_he``: bios with no 'she'/'he', whose P-score conversion is 1 by default."""
        without = sum(not has_subject_pronoun(example.fields["bio"]) for example in self.examples)
        return {**super().counts(), "bios_without_she_he": without}
