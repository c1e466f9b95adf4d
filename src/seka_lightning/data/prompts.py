"""PromptDataModule: highlighted prompts for ``seka predict``, from the config or a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from seka_lightning.resources import resolve_data_path

ANSWER_FIELDS = ("target", "original")  # optional per prompt: the highlighted answer and the one it overrides


def read_prompt_records(path: str | Path) -> list[dict[str, str]]:
    """Prompt records from JSONL (``{"prompt": ...}`` per line, optionally with ``target`` and ``original``, the
    highlighted answer and the overridden one, which ``seka predict`` scores) or plain text (one prompt per line)."""
    path = resolve_data_path(path)  # a shipped file when a relative path is missing here
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        records.append(_parse_line(line, path, line_no) if path.suffix == ".jsonl" else {"prompt": line})
    return records


def _parse_line(line: str, path: Path, line_no: int) -> dict[str, str]:
    """One JSONL prompt record; ``target`` and ``original`` come together, as non-empty strings."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{path}:{line_no}: each line needs a "prompt" string')
    present = [field for field in ANSWER_FIELDS if field in record]
    if present and len(present) < len(ANSWER_FIELDS):
        missing = next(field for field in ANSWER_FIELDS if field not in record)
        raise ValueError(
            f'{path}:{line_no}: "{present[0]}" is given without "{missing}"; give both (the highlighted answer and '
            "the one it overrides) or neither"
        )
    for field in present:
        value = record[field]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{path}:{line_no}: "{field}" must be a non-empty string, got {value!r}')
    return {"prompt": record["prompt"], **{field: record[field].strip() for field in present}}


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of :func:`read_prompt_records`, without their answers."""
    return [record["prompt"] for record in read_prompt_records(path)]


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


class PromptDataModule(L.LightningDataModule):
    """Prompts with ``**highlights**`` (markers configurable in the model) for side-by-side generation."""

    def __init__(self, prompts: list[str] | None = None, *, path: str | None = None, batch_size: int = 4) -> None:
        """
        Args:
            prompts: prompts given inline in the config.
            path: a ``.jsonl`` file with ``{"prompt": ...}`` lines (optionally with ``target`` and ``original``
                answers, for the summary of ``seka predict``), or a text file with one prompt per line.
            batch_size: prompts per generation batch.
        """
        super().__init__()
        if (prompts is None) == (path is None):
            raise ValueError("give exactly one of data.prompts or data.path")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompts, self.path, self.batch_size = prompts, path, batch_size

    def predict_dataloader(self) -> DataLoader:
        if self.prompts is not None:
            prompts = [{"prompt": p} for p in self.prompts]
        else:
            prompts = read_prompt_records(self.path)
        if not prompts:
            raise ValueError(f"no prompts found in {self.path or 'data.prompts'}; add at least one")
        records = [{"index": i, **record} for i, record in enumerate(prompts)]
        return DataLoader(records, batch_size=self.batch_size, collate_fn=_as_list)
