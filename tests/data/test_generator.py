"""The synthetic QA generator: determinism, validity, the validator's messages, shipped files, statistics."""

import json
import re
from pathlib import Path

import pytest

from seka_lightning.data.generator import (
    FIELDS,
    corpus_statistics,
    generate_pairs,
    invented_words,
    main,
    name_split,
    read_pairs,
    validate_file,
    validate_pair,
    write_pairs,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "synthetic_qa.jsonl"
HELDOUT = REPO / "data" / "synthetic_qa_heldout.jsonl"
CONFIG = REPO / "configs" / "data" / "generate.yaml"
PAPER_PAIRS = REPO.parent / "shared" / "reference" / "synthetic_pair_qa.jsonl"

VALID = {
    "id": 7,
    "context_1": "The Azure Keepers guard the northern gate at dusk.",
    "question_1": "What do the Azure Keepers guard?",
    "answer_1": "the northern gate",
    "context_2": "The Velvet Moths hatch beside the frozen lake.",
    "question_2": "Where do the Velvet Moths hatch?",
    "answer_2": "beside the frozen lake",
}


def pair_invented_words(pairs: list[dict[str, object]]) -> set[str]:
    return {w for p in pairs for key in FIELDS[1:] for w in invented_words(str(p[key]))}


def test_same_seed_gives_identical_bytes_and_prefixes(tmp_path: Path) -> None:
    a = write_pairs(generate_pairs(150, seed=3), tmp_path / "a.jsonl")
    b = write_pairs(generate_pairs(150, seed=3), tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()
    assert generate_pairs(40, seed=3) == generate_pairs(150, seed=3)[:40]


def test_different_seed_or_split_gives_different_pairs() -> None:
    base = generate_pairs(50, seed=3)
    for other in (generate_pairs(50, seed=4), generate_pairs(50, seed=3, split="heldout")):
        contexts = {p["context_1"] for p in base}
        assert not contexts & {p["context_1"] for p in other}


def test_generated_pairs_are_valid_distinct_and_exact_case() -> None:
    pairs = generate_pairs(400, seed=11) + generate_pairs(100, seed=12, split="heldout")
    assert [p["id"] for p in pairs[:400]] == list(range(1, 401))
    for pair in pairs:
        assert validate_pair(pair) == [], pair
        for i, j in ((1, 2), (2, 1)):
            context, answer = str(pair[f"context_{i}"]), str(pair[f"answer_{i}"])
            assert answer in context  # exact case, not only case-insensitive
            assert context.lower().count(answer.lower()) == 1
            assert answer.lower() not in str(pair[f"question_{j}"]).lower()
            assert context.endswith(".") and str(pair[f"question_{i}"]).endswith("?")
    contexts = [p[f"context_{i}"] for p in pairs[:400] for i in (1, 2)]
    assert len(set(contexts)) == len(contexts)


def test_answer_positions_vary() -> None:
    stats = corpus_statistics(generate_pairs(300, seed=5))
    for third in ("first", "middle", "last"):
        assert stats[f"answer_offset_{third}_third_share"] > 0.15


def test_splits_share_no_invented_word() -> None:
    train = pair_invented_words(generate_pairs(200, seed=0))
    heldout = pair_invented_words(generate_pairs(200, seed=0, split="heldout"))
    assert train and heldout
    assert not train & heldout
    assert {name_split(w) for w in train} == {"train"}
    assert {name_split(w) for w in heldout} == {"heldout"}


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=re.escape("n must be >= 1, got 0")):
        generate_pairs(0)
    with pytest.raises(ValueError, match=re.escape("split must be 'train' or 'heldout', got 'test'")):
        generate_pairs(5, split="test")  # type: ignore[arg-type]


def with_changes(**changes: object) -> dict[str, object]:
    pair = dict(VALID)
    for key, value in changes.items():
        if value is None and key != "id":
            del pair[key]
        else:
            pair[key] = value
    return pair


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (with_changes(answer_2=None), "missing field 'answer_2'"),
        (with_changes(question_1=""), "field 'question_1' must be a non-empty string, got ''"),
        (with_changes(context_2=3), "field 'context_2' must be a non-empty string, got 3"),
        (with_changes(id=None), "field 'id' must be an int or a non-empty string, got None"),
        (with_changes(answer_1="the northern gate "), "field 'answer_1' has leading or trailing whitespace; strip it"),
        (
            with_changes(context_2=VALID["context_1"], question_2="Where is it?", answer_2="at dusk"),
            "context_1 and context_2 are identical; a pair needs two unrelated contexts",
        ),
        (
            with_changes(answer_1="the southern gate"),
            "answer_1 'the southern gate' is not a span of context_1 (case-insensitive)",
        ),
        (
            with_changes(question_1="What do the Azure Keepers guard beside the frozen lake?"),
            "answer_2 'beside the frozen lake' appears in question_1, the irrelevant question of its negative text",
        ),
        (
            with_changes(question_1="What do the Azure Keepers guard, the northern gate?"),
            "answer_1 'the northern gate' appears in question_1; the question gives it away",
        ),
        (
            with_changes(context_1="The Azure Lamplighters guard a lamp.", answer_1="lamp"),
            "answer_1 'lamp' first occurs inside a longer word of context_1; "
            "the builder would highlight part of that word",
        ),
    ],
)
def test_validator_reports_each_malformed_kind(pair: dict[str, object], message: str) -> None:
    assert validate_pair(VALID) == []
    assert message in validate_pair(pair)


def test_validator_checks_first_occurrence_in_all_three_spec_texts() -> None:
    # "on" is a span of the context, but "Context" and "Question" contain it first.
    pair = with_changes(context_1="The Azure Keepers sit on benches.", question_1="Where do they sit?", answer_1="on")
    problems = validate_pair(pair)
    expected = {
        "neutral": "Context: The Azure Keepers sit on benches. ",
        "positive": "Question: Where do they sit?\nContext: The Azure Keepers sit on benches.",
        "negative": f"Question: {VALID['question_2']}\nContext: The Azure Keepers sit on benches.",
    }
    for name, text in expected.items():
        assert (
            f"answer_1 'on' first occurs outside the context in the {name} text {text!r}; "
            "the builder takes the first occurrence"
        ) in problems
    assert len(problems) == 3


def test_validate_file_reports_lines_duplicates_and_raises(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    broken = with_changes(answer_1="nowhere")
    path.write_text("\n".join([json.dumps(VALID), json.dumps(broken), "{not json", "[1]"]) + "\n", encoding="utf-8")
    problems = validate_file(path, raise_errors=False)
    assert problems == [
        "line 2: answer_1 'nowhere' is not a span of context_1 (case-insensitive)",
        "line 2: duplicate id 7 (first on line 1)",
        "line 3: not valid JSON (Expecting property name enclosed in double quotes)",
        "line 4: expected a JSON object, got list",
    ]
    with pytest.raises(ValueError, match=re.escape(f"{path}: 4 problem(s) in synthetic QA pairs:")):
        validate_file(path)


def test_write_pairs_is_atomic_and_ordered(tmp_path: Path) -> None:
    path = tmp_path / "out" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("old\n", encoding="utf-8")
    shuffled = dict(reversed(list(VALID.items())))
    write_pairs([shuffled], path)
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]
    assert list(json.loads(path.read_text(encoding="utf-8"))) == list(FIELDS)
    assert read_pairs(path) == [VALID]


def test_shipped_files_are_valid_and_disjoint() -> None:
    if not SHIPPED.exists() or not HELDOUT.exists():
        pytest.skip(f"shipped synthetic QA files missing under {SHIPPED.parent}")
    assert validate_file(SHIPPED) == []
    assert validate_file(HELDOUT) == []
    train, heldout = read_pairs(SHIPPED), read_pairs(HELDOUT)
    assert (len(train), len(heldout)) == (2000, 300)
    assert not pair_invented_words(train) & pair_invented_words(heldout)


def test_shipped_files_copy_nothing_from_the_paper() -> None:
    if not PAPER_PAIRS.exists() or not SHIPPED.exists():
        pytest.skip(f"needs the paper's pairs at {PAPER_PAIRS} and the shipped file at {SHIPPED}")
    paper = read_pairs(PAPER_PAIRS)
    assert validate_file(PAPER_PAIRS) == []  # the validator accepts the reference data
    texts = {str(p[k]).lower() for p in paper for k in FIELDS[1:] if not k.startswith("answer")}
    shipped = read_pairs(SHIPPED) + read_pairs(HELDOUT)
    assert not texts & {str(p[k]).lower() for p in shipped for k in FIELDS[1:] if not k.startswith("answer")}


def test_shipped_files_regenerate_byte_identically(tmp_path: Path) -> None:
    if not SHIPPED.exists() or not HELDOUT.exists():
        pytest.skip(f"shipped synthetic QA files missing under {SHIPPED.parent}")
    from_config = tmp_path / "config.jsonl"
    main(["--config", str(CONFIG), "--out", str(from_config)])
    assert from_config.read_bytes() == SHIPPED.read_bytes()
    from_flags = tmp_path / "flags.jsonl"
    main(["--n", "2000", "--seed", "0", "--out", str(from_flags)])
    assert from_flags.read_bytes() == SHIPPED.read_bytes()
    heldout = tmp_path / "heldout.jsonl"
    main(["--config", str(CONFIG), "--n", "300", "--seed", "1", "--split", "heldout", "--out", str(heldout)])
    assert heldout.read_bytes() == HELDOUT.read_bytes()


def test_config_names_the_shipped_file() -> None:
    text = CONFIG.read_text(encoding="utf-8")
    assert re.search(r"^out: data/synthetic_qa\.jsonl$", text, flags=re.MULTILINE)


def test_corpus_statistics_on_a_hand_computed_toy() -> None:
    pairs = [
        {
            "id": 1,
            "context_1": "Bees make honey.",  # 3 words, 16 chars, answer at 10
            "question_1": "What do bees make?",
            "answer_1": "honey",
            "context_2": "Old ships sail at dawn.",  # 5 words, 23 chars, answer at 15
            "question_2": "When do old ships sail?",
            "answer_2": "at dawn",
        },
        {
            "id": 2,
            "context_1": "The Blue Owls guard the gate.",  # 6 words, 29 chars, answer at 4
            "question_1": "Who guards the gate?",
            "answer_1": "Blue Owls",
            "context_2": "Kites ride the wind.",  # 4 words, 20 chars, answer at 11
            "question_2": "What do the kites ride?",
            "answer_2": "the wind",  # shares "the" with its question
        },
    ]
    stats = corpus_statistics(pairs)
    expected = {
        "pairs": 2,
        "items": 4,
        "context_words_mean": 4.5,
        "context_words_min": 3,
        "context_words_max": 6,
        "context_chars_mean": 22.0,
        "context_chars_min": 16,
        "context_chars_max": 29,
        "question_words_mean": 4.5,
        "question_words_min": 4,
        "question_words_max": 5,
        "answer_words_mean": 1.75,
        "answer_words_min": 1,
        "answer_words_max": 2,
        "answer_chars_mean": 7.25,
        "answer_chars_min": 5,
        "answer_chars_max": 9,
        "answer_found_share": 1.0,
        "answer_offset_mean": (10 / 16 + 15 / 23 + 4 / 29 + 11 / 20) / 4,
        "answer_offset_first_third_share": 0.25,
        "answer_offset_middle_third_share": 0.75,
        "answer_offset_last_third_share": 0.0,
        "answer_ends_context_share": 0.75,
        "tokens": 36,
        # bees make honey what do | old ships sail at dawn when | the blue owls guard gate who guards | kites ride wind
        "vocabulary_size": 21,
        "type_token_ratio": 21 / 36,
        "answer_question_overlap_mean": 0.5 / 4,
        "answer_question_content_overlap_mean": 0.0,
        "answer_question_any_overlap_share": 0.25,
        "answer_in_question_share": 0.0,
    }
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-12), key
    with pytest.raises(ValueError, match="pairs is empty"):
        corpus_statistics([])
