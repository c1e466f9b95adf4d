"""BenchmarkWriter: predictions.jsonl.gz and metric_result.json whose metrics are the contract recomputation of the
written records, with intervals, counts and provenance; a scorer that disagrees with its own records is caught."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from seka_lightning.embedded import embedded_spec
from seka_lightning.evidence import read_predictions, summarize
from seka_lightning.lit.writers import BenchmarkWriter, build_metric_result
from seka_lightning.provenance import config_files, weights_hash

REPO = Path(__file__).resolve().parents[2]

# two batches of a lost-in-the-middle-like run: question q1 at two gold positions, q2 at one
BATCHES = [
    [
        {"uid": 2, "id": "q1@pos4", "prediction": "Paris", "scores": {"exact_match": 1.0, "exact_match_pos_4": 1.0}},
        {"uid": 0, "id": "q1@pos0", "prediction": "Lyon", "scores": {"exact_match": 0.0, "exact_match_pos_0": 0.0}},
    ],
    [{"uid": 1, "id": "q2@pos0", "prediction": "1969", "scores": {"exact_match": 1.0, "exact_match_pos_0": 1.0}}],
]


def fake_run(metrics: dict[str, float], model: str) -> tuple[SimpleNamespace, SimpleNamespace]:
    trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        is_global_zero=True,
        strategy=SimpleNamespace(barrier=lambda name: None),
        datamodule=SimpleNamespace(seed=5),
    )
    results = {
        "metrics": metrics,
        "method": {"method": "random", "seed": 2, "gain_pos": 1.5},
        "model": model,
        "config": {"dtype": "float32", "data": {"benchmark": "lost_in_the_middle", "example_subset": "0:2"}},
        "counts": {"examples": 3, "world_size": 1},
        "wall_time_s": 1.0,
    }
    return trainer, SimpleNamespace(results=lambda: results)


def test_writer_files_agree_with_the_recomputation(tmp_path, monkeypatch):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights")
    (weights / "config.json").write_text("{}")
    config = tmp_path / "eval.yaml"
    config.write_text("trainer: {}\n")
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything sets
    monkeypatch.setattr(sys, "argv", ["seka", "predict", "-c", str(config), "--model.pretrained", str(weights)])
    scorer = {"exact_match": 2 / 3, "exact_match_pos_0": 0.5, "exact_match_pos_4": 1.0, "fluency": 3.25}
    trainer, module = fake_run(scorer, str(weights))
    BenchmarkWriter(str(tmp_path / "out")).write_on_epoch_end(trainer, module, BATCHES, [])

    records = read_predictions(tmp_path / "out" / "predictions.jsonl.gz")
    assert [r["uid"] for r in records] == [0, 1, 2]
    result = json.loads((tmp_path / "out" / "metric_result.json").read_text())
    expected = summarize(records)
    assert (
        result["metrics"]
        == expected["metrics"]
        == {"exact_match": 2 / 3, "exact_match_pos_4": 1.0, "exact_match_pos_0": 0.5}
    )
    assert result["intervals"] == expected["intervals"] and result["n"] == {
        "exact_match": 3,
        "exact_match_pos_0": 2,
        "exact_match_pos_4": 1,
    }
    assert result["aggregate_metrics"] == {"fluency": 3.25}  # no per-example scores: kept apart, not verifiable
    provenance = result["provenance"]
    assert provenance["command"] == sys.argv
    assert provenance["config_files"] == [{"path": str(config), "sha256": hashlib.sha256(b"trainer: {}\n").hexdigest()}]
    inner = hashlib.sha256(b"weights").hexdigest().encode()
    assert provenance["model"]["sha256"] == hashlib.sha256(inner).hexdigest()
    assert provenance["model"]["files"] == ["model.safetensors"]
    assert provenance["seeds"] == {"method": 2, "data": 5, "bootstrap": 0, "global": "7"}
    assert provenance["data"] == {"benchmark": "lost_in_the_middle", "example_subset": "0:2"}
    assert provenance["method"]["gain_pos"] == 1.5 and provenance["config"] == {"dtype": "float32"}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance["git"]["commit"] == head and isinstance(provenance["git"]["dirty"], bool)


def test_a_scorer_that_disagrees_with_its_records_is_named(tmp_path):
    records = [record for batch in BATCHES for record in batch]
    _, module = fake_run({"exact_match": 0.5, "exact_match_pos_0": 0.5}, "org/model")
    with pytest.raises(ValueError) as info:
        build_metric_result(records, module.results(), seeds={"bootstrap": 0}, argv=["seka"])
    assert str(info.value) == (
        "the scorer's metrics disagree with their recomputation from the per-example scores (exact_match: scorer 0.5, "
        f"recomputed from the predictions {2 / 3!r}); the scorer's records do not follow the contract in "
        "seka_lightning.evidence, fix the scorer"
    )


def test_records_without_the_contract_are_refused(tmp_path):
    trainer, module = fake_run({"exact_match": 1.0}, "org/model")
    writer = BenchmarkWriter(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="prediction record 0 has no 'id' and 'scores' object"):
        writer.write_on_epoch_end(trainer, module, [[{"uid": 0, "exact_match": 1.0}]], [])
    assert not (tmp_path / "out" / "metric_result.json").exists()


def test_bank_file_hash_and_model_hash_sources(tmp_path):
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(b"bank")
    records = [record for batch in BATCHES for record in batch]
    results = {**fake_run({}, "embedded:smollm2-135m")[1].results(), "method": {"method": "seka", "bank": str(bank)}}
    provenance = build_metric_result(records, results, seeds={}, argv=["seka", "--config=missing.yaml"])["provenance"]
    assert provenance["method_files"] == {str(bank): hashlib.sha256(b"bank").hexdigest()}
    assert provenance["model"]["sha256"] == embedded_spec("smollm2-135m").sha256
    assert "tokenizer_sha256" not in provenance["model"]  # the evaluator gave none
    with_tokenizer = {**results, "tokenizer_sha256": "ab" * 32}
    result = build_metric_result(records, with_tokenizer, seeds={}, argv=["seka"])
    assert result["provenance"]["model"]["tokenizer_sha256"] == "ab" * 32 and "tokenizer_sha256" not in result
    assert (
        provenance["config_files"]
        == config_files(["--config=missing.yaml"])
        == [{"path": "missing.yaml", "sha256": None}]
    )
    assert weights_hash("org/model") == {
        "sha256": None,
        "reason": "a hub id: the weights come from the Hugging Face cache; pass a local folder to record a hash",
    }


def test_under_ddp_a_signal_only_sets_a_flag_and_the_writer_puts_back_the_handlers_it_replaced(tmp_path):
    """Lightning's SIGTERM handler runs a collective; the writer's records the signal only. A signal after the ranks'
    last agreement still makes the run exit ``128 + signum``; the teardown restores the handlers it replaced, and
    leaves alone handlers that Lightning's own teardown has already put back."""
    import signal

    from seka_lightning.lit.callbacks import BuildStopped

    ranks = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    trainer = SimpleNamespace(world_size=2, received_sigterm=False, strategy=ranks)
    writer = BenchmarkWriter(str(tmp_path / "out"))
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    def lightnings(signum, frame) -> None:
        raise AssertionError("the replaced handler must not run")

    try:
        signal.signal(signal.SIGTERM, lightnings)
        writer.on_predict_start(trainer, None)
        assert signal.getsignal(signal.SIGTERM) is not lightnings
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: recorded (a second signal would stop at once)
        with pytest.raises(BuildStopped) as stopped:
            writer.on_predict_end(trainer, None)
        assert stopped.value.code == 128 + signal.SIGINT
        writer.teardown(trainer, None, "predict")
        assert signal.getsignal(signal.SIGTERM) is lightnings
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]

        writer.on_predict_start(trainer, None)
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])  # as Lightning's teardown does before the callbacks'
        writer.teardown(trainer, None, "predict")
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]

        # a SIGTERM that Lightning's handler took before the writer's was installed is not lost
        writer.on_predict_start(SimpleNamespace(world_size=2, received_sigterm=True, strategy=ranks), None)
        with pytest.raises(BuildStopped) as stopped:
            writer.on_predict_end(trainer, None)
        assert stopped.value.code == 128 + signal.SIGTERM
        writer.teardown(trainer, None, "predict")
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
