"""PromptDataModule: highlighted prompts for ``seka predict``, from the config or a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from seka_lightning.resources import resolve_data_path


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL (``{"prompt": "..."}`` per line) or plain text (one prompt per line)."""
    path = resolve_data_path(path)  # a shipped file when a relative path is missing here
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{line_no}: each line needs a "prompt" string')
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    return prompts


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


class PromptDataModule(L.LightningDataModule):
    """Prompts with ``**highlights**`` (markers configurable in the model) for side-by-side generation."""

    def __init__(self, prompts: list[str] | None = None, *, path: str | None = None, batch_size: int = 4) -> None:
        """
        Args:
            prompts: prompts given inline in the config.
            path: a ``.jsonl`` file with ``{"prompt": ...}`` lines, or a text file with one prompt per line.
            batch_size: prompts per generation batch.
        """
        super().__init__()
        if (prompts is None) == (path is None):
            raise ValueError("give exactly one of data.prompts or data.path")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.prompts, self.path, self.batch_size = prompts, path, batch_size

    def predict_dataloader(self) -> DataLoader:
        prompts = self.prompts if self.prompts is not None else read_prompts(self.path)
        if not prompts:
            raise ValueError(f"no prompts found in {self.path or 'data.prompts'}; add at least one")
        records = [{"index": i, "prompt": p} for i, p in enumerate(prompts)]
        return DataLoader(records, batch_size=self.batch_size, collate_fn=_as_list)
