"""How often a lost-in-the-middle answer copies from the gold document, and how often such an answer scores.

    python scripts/results/litm_copies.py [--results docs/results] [--words 5]

For every run under RESULTS/lost_in_the_middle/<model>/<method>/ and the records whose gold document is among the
highlighted ones: the share of answers holding a run of WORDS consecutive words of the gold document (a copy), and
the exact match among those answers. Reads only the committed predictions (each record's prompt text names the
documents, separated by blank lines after "Context:").
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def documents(text: str) -> list[str]:
    """The prompt's documents, in order."""
    return text.split("Context:\n", 1)[1].split("\n\n")


def copies(answer: str, document: str, words: int) -> bool:
    """Whether ``answer`` holds ``words`` consecutive words of ``document`` (whitespace-normalized)."""
    tokens, doc = answer.split(), " ".join(document.split())
    return any(" ".join(tokens[i : i + words]) in doc for i in range(len(tokens) - words + 1))


def summarize(path: Path, words: int) -> dict[str, float]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    inside = [r for r in records if r["gold_inside_highlight"]]
    copied = [r for r in inside if copies(r["prediction"], documents(r["text"])[r["gold_position"]], words)]
    return {
        "inside": len(inside),
        "copies_gold_pct": 100 * len(copied) / len(inside) if inside else float("nan"),
        "exact_match_of_copies_pct": 100 * sum(r["exact_match"] for r in copied) / len(copied)
        if copied
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--words", type=int, default=5)
    args = parser.parse_args()
    for path in sorted((args.results / "lost_in_the_middle").glob("*/*/predictions.jsonl.gz")):
        row = summarize(path, args.words)
        print(
            f"{path.parent.parent.name:14s} {path.parent.name:12s} inside n={row['inside']}: copies the gold document "
            f"{row['copies_gold_pct']:.1f}%, exact match among those {row['exact_match_of_copies_pct']:.1f}%"
        )


if __name__ == "__main__":
    main()
