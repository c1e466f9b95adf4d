"""PronChange: rewrite a biography with "they" pronouns, with the instruction highlighted.

Uses the same bios as BiasBios (see ``biasbios.py`` for the accepted layouts). By default it
takes the shared folder's ``_complete`` CSV: its 1,000 bios are the ones the folder's
``df_masked_pronoun`` file gives with pronouns replaced by "they", i.e. the PronChange set.
"""

from __future__ import annotations

from os import PathLike

from seka_lightning.data.benchmarks.biasbios import CsvSet, read_bios
from seka_lightning.data.benchmarks.records import BenchmarkExamples, HighlightedExample, select_subset

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
