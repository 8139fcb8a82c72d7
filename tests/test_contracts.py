"""The files stages hand each other (lmforge/runs/contracts.py) and the one stage wrapper (pipeline/stage.py)."""

from __future__ import annotations

import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.formats import CorpusError
from lmforge.runs.contracts import ArtifactError, ChampionRecord, Decision, Manifest
from pipeline.stage import run_stage


def test_a_missing_or_damaged_artifact_names_the_file_and_the_stage_to_run(tmp_path):
    with pytest.raises(ArtifactError, match=r"manifest.json is missing: run the preprocess stage first"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"not valid JSON; run the preprocess stage again"):
        Manifest.read(tmp_path)
    (tmp_path / "gate.json").write_text(json.dumps({"promote": "perhaps", "reasons": [], "challenger": {}}))
    with pytest.raises(ArtifactError, match=r"gate.json is damaged .*run the gate stage again"):
        Decision.load(tmp_path / "gate.json")


def test_a_record_keeps_what_it_does_not_know(tmp_path):
    """A champion written by another lmforge version loads, compares and saves back whole."""
    data = {"model_md5": "ab", "metrics": {"val_perplexity": 3.0}, "written_by": "lmforge 9"}
    record = ChampionRecord.parse(data, "s3://b/registry/champion.json")
    assert record.to_dict()["written_by"] == "lmforge 9" and record == ChampionRecord.parse(
        record.to_dict(), "x"
    )
    decision = Decision(promote=True, reasons=["pass: ok"], challenger={}, champion=record)
    decision.save(tmp_path / "gate.json")
    assert Decision.load(tmp_path / "gate.json") == decision


def fail_with(exc: BaseException):
    def body():
        raise exc

    return body


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [(CorpusError("data/: no such file or directory"), 1, "error: data/: no such file or directory"),
     (ConfigError("train.lr: too big"), 2, "error: train.lr: too big"),
     (ArtifactError("artifacts/gate.json is missing"), 2, "error: artifacts/gate.json is missing"),
     (FileNotFoundError(2, "gone", "artifacts/x"), 2, "error: artifacts/x: not found; run the stages before "
                                                      "gate (dvc repro gate)")],
)  # fmt: skip
def test_every_expected_failure_ends_with_its_message_and_exit_code(error, code, says, capsys):
    assert run_stage("gate", fail_with(error)) == code
    err = capsys.readouterr().err
    assert err.strip() == says


def test_a_bug_is_not_hidden_as_an_expected_failure():
    with pytest.raises(KeyError):
        run_stage("gate", fail_with(KeyError("a bug")))
    assert run_stage("gate", lambda: None) == 0 and run_stage("validate", lambda: 1) == 1
