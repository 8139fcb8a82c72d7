"""The files stages hand each other, typed: each format has one writer and one reader, here.

  Manifest          artifacts/shards/manifest.json   preprocess -> train, evaluate, the run summary
  ValidationReport  artifacts/validation/report.json validate -> preprocess, registry, the run summary
  Decision          artifacts/gate.json              gate -> package, the run's plan
  ChampionRecord    s3://<bucket>/<registry>/champion.json (and history/): registry <-> gate, serve
  RunSummary        what a run ends with: the flow's result, printed by `lmforge run`

A file that is missing or does not parse is an ArtifactError that names it and the stage that writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.atomic import write_text_atomic
from infra.errors import UsageError

SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")


class ArtifactError(UsageError):
    """A stage's input file is missing or damaged: the stage that writes it has to run (again)."""


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path, writer: str) -> Any:
    """A stage's JSON output; writer names the stage that writes it, for the error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: run the {writer} stage first") from None
    try:
        return json.loads(text)
    except ValueError:
        raise ArtifactError(f"{path} is not valid JSON; run the {writer} stage again") from None


Model = TypeVar("Model", bound="Contract")


class Contract(BaseModel):
    # Unknown keys are kept: a record written by a newer lmforge still loads, and saves back whole.
    model_config = ConfigDict(extra="allow")

    WRITER: ClassVar[str] = "?"  # the stage that writes the file, for the error message

    @classmethod
    def parse(cls: type[Model], data: Any, origin: str) -> Model:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(
                f"{origin} is damaged ({exc.error_count()} problems, first: {exc.errors()[0]['msg']} at "
                f"{'.'.join(map(str, exc.errors()[0]['loc']))}); run the {cls.WRITER} stage again"
            ) from None

    @classmethod
    def load(cls: type[Model], path: Path) -> Model:
        return cls.parse(read_json(path, cls.WRITER), str(path))

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def to_dict(self) -> dict:
        """Plain JSON values (an odd observed value, such as a numpy number, becomes its str)."""
        return json.loads(json.dumps(self.model_dump(), default=str))


# ---------------------------------------------------------------------------------------------
# preprocess -> train, evaluate


class ShardFile(BaseModel):
    file: str
    tokens: int
    # conversations (ingest.format chat): beside the tokens, in the same layout, a uint8 loss mask (1 on
    # the assistant's tokens) and the uint32 offset of each conversation's first token; none is cut
    mask: str | None = None
    starts: str | None = None


class SplitInfo(BaseModel):
    documents: int
    tokens: int
    shards: list[ShardFile]


class Manifest(Contract):
    """What preprocess wrote: the shards of each split, their dtype and the tokenizer's facts."""

    WRITER: ClassVar[str] = "preprocess"
    FILE: ClassVar[str] = "manifest.json"

    dtype: Literal["uint16", "uint32"]
    vocab_size: int
    eos_token_id: int
    tokenizer: Literal["base", "trained"]
    tokenizer_sample: dict[str, int] | None = None  # chars and documents the tokenizer learnt from
    splits: dict[str, SplitInfo]
    total_tokens: int
    # this run's encode pass: on the object preprocess returns, never in the file, so that the same corpus
    # and params write the same bytes on every run and engine
    encode_seconds: float | None = Field(None, exclude=True)
    tokens_per_second: int | None = Field(None, exclude=True)
    # the held-out text, split -> a JSONL file beside the shards ({"text": ...} per document, corpus order;
    # a conversation's line also holds its "messages")
    text: dict[str, str] | None = None
    format: Literal["text", "chat"] = "text"
    # chat: {"template": the chat template every conversation was rendered with, "end_of_turn_ids",
    # "dropped": {reason: count}} (conversations that do not fit the context or the template)
    chat: dict[str, Any] | None = None
    # the share of val and test word n-grams that also occur in train:
    # {"unit", "ngram", "sample_rate", "val", "test", "val_ngrams", ..., "by_script": {script: {...}}}
    contamination: dict[str, Any] | None = None

    @classmethod
    def read(cls, shards_dir: Path) -> Manifest:
        return cls.load(shards_dir / cls.FILE)

    def write(self, shards_dir: Path) -> None:
        self.save(shards_dir / self.FILE)

    def tokens(self) -> dict[str, int]:
        return {split: info.tokens for split, info in self.splits.items()}

    def held_out_texts(self, shards_dir: Path, split: str) -> list[str]:
        """The split's documents as text, in corpus order."""
        if not self.text or split not in self.text:
            raise ArtifactError(
                f"{shards_dir / self.FILE} names no {split} text (written by an older lmforge); "
                "run the preprocess stage again"
            )
        return list(read_held_out(shards_dir, self.text[split]))

    def held_out_conversations(self, shards_dir: Path, split: str) -> list[list[dict]]:
        """A chat corpus's split as messages, in the order of held_out_texts."""
        self.held_out_texts(shards_dir, split)  # the same checks
        return list(read_held_out(shards_dir, self.text[split], "messages"))

    @property
    def chat_template(self) -> str | None:
        return (self.chat or {}).get("template")


def read_held_out(shards_dir: Path, name: str, field: str = "text") -> Iterator[Any]:
    path = shards_dir / name
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)[field]
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: run the preprocess stage again") from None
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{path} is damaged; run the preprocess stage again") from None


# ---------------------------------------------------------------------------------------------
# train -> evaluate -> gate


def read_train_log(path: Path) -> list[dict]:
    """artifacts/train_log.jsonl, one record per step; a line torn by the kill that caused a restart is
    skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class TrainSummary(Contract):
    """artifacts/model/train_summary.json: how the exported model was trained."""

    WRITER: ClassVar[str] = "train"
    FILE: ClassVar[str] = "train_summary.json"

    steps: int
    final_train_loss: float | None
    tokens_per_s: int | None  # the steady-state median (lmforge.training.throughput)
    mfu: float | None
    world_size: int
    parameters: int
    rank_weight_checksums: list[
        float
    ]  # DDP: one per rank, all equal, or DDP failed; FSDP: the gathered model's


# The loss curve, one JSON list per series: DVC cannot plot a list whose records lack a field, and val
# is measured only every eval_every steps.
TRAIN_CURVE, VAL_CURVE = "loss_curve.json", "val_curve.json"


def write_curves(eval_dir: Path, log_records: list[dict]) -> None:
    train = [{"step": r["step"], "train_loss": r["train_loss"]} for r in log_records]
    val = [{"step": r["step"], "val_loss": r["val_loss"]} for r in log_records if "val_loss" in r]
    write_text_atomic(eval_dir / TRAIN_CURVE, json.dumps(train) + "\n")
    write_text_atomic(eval_dir / VAL_CURVE, json.dumps(val) + "\n")


def read_curve(eval_dir: Path) -> list[dict]:
    """Both series merged by step: {"step", "train_loss"[, "val_loss"]}; [] before evaluate wrote them."""
    if not (eval_dir / TRAIN_CURVE).is_file():
        return []
    points = {p["step"]: dict(p) for p in read_json(eval_dir / TRAIN_CURVE, "evaluate")}
    val_file = eval_dir / VAL_CURVE
    for p in read_json(val_file, "evaluate") if val_file.is_file() else []:
        points.setdefault(p["step"], {"step": p["step"]}).update(p)
    return [points[step] for step in sorted(points)]


METRICS_FILE = "metrics.json"
# artifacts/eval/scores.json: per split, the documents scored and each model's bits, tokens and bytes per
# document ({"val": {"documents": [...], "challenger": {...}, "base": {...}}, ...}), for the gate
SCORES_FILE = "scores.json"


def read_metrics(eval_dir: Path) -> dict[str, Any]:
    """artifacts/eval/metrics.json: evaluate's flat metrics (also DVC's), which the gate judges."""
    return read_json(eval_dir / METRICS_FILE, "evaluate")


# ---------------------------------------------------------------------------------------------
# validate -> preprocess, the registry


@dataclass
class Check:
    name: str  # "min_documents", "doc_length", "secret:aws_access_key_id", ...
    expectation: str  # the GE expectation type, e.g. expect_column_values_to_be_between
    success: bool
    observed: Any  # a number for corpus-level checks, "k of n documents ..." for per-document ones
    bound: str
    example: str | None = None  # a failing document: its source and a short (masked) snippet


class ValidationReport(Contract):
    """What validation found: kept and dropped documents by reason, and each check against its bound."""

    WRITER: ClassVar[str] = "validate"
    FILE: ClassVar[str] = "report.json"

    corpus: str
    success: bool
    stats: dict[str, Any]
    checks: list[Check] = []
    files: list[dict] = []  # each read file: format, layout, documents
    skipped: list[str] = []  # files of other kinds
    examples: dict[str, list[str]] = {}  # dropped documents, by reason
    # one JSON line per dropped document, a temporary file while validation runs (validate writes it out)
    dropped_records: Any = Field(None, exclude=True, repr=False)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.success]

    @classmethod
    def read(cls, validation_dir: Path) -> ValidationReport | None:
        """The report, or None when validation has not written one (a workspace that skipped it)."""
        path = validation_dir / cls.FILE
        return cls.load(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# the registry and the gate


class ChampionRecord(Contract):
    """The current model, as the registry keeps it in S3: where it is, how good, where it came from."""

    WRITER: ClassVar[str] = "publish"

    model_md5: str
    model_url: str | None = None
    metrics: dict[str, Any]
    data_md5: str | None = None
    data_stats: dict[str, Any] | None = None  # the size of its corpus, for the shrink guard at ingest
    git_sha: str | None = None
    profile: str | None = None
    loss_curve: list[dict] = []  # so that the next challenger's comparison can overlay it
    bento_tag: str | None = None
    bento_url: str | None = None
    lineage: dict[str, str] | None = None  # the Bento's labels
    flow_run_id: str | None = None
    params: dict[str, Any] | None = None
    promoted_at: str | None = None
    rolled_back_from: str | None = None
    rolled_back_at: str | None = None

    @property
    def name(self) -> str:
        return self.bento_tag or self.model_md5


def record_name(record: ChampionRecord | None) -> str:
    return "no champion" if record is None else record.name


class Decision(Contract):
    """The gate's verdict on the challenger, each check a reason, against the champion it judged by."""

    WRITER: ClassVar[str] = "gate"

    promote: bool
    reasons: list[str]
    challenger: dict[str, Any]  # the challenger's metrics (evaluate's metrics.json)
    champion: ChampionRecord | None
    # "champion" / "base" -> split -> the challenger against that model on the same bytes
    # (scoring.paired_difference: both bits per byte, the relative difference and its interval)
    head_to_head: dict[str, Any] = {}
    tasks: dict[str, Any] = {}  # "challenger" / "champion" -> task file -> its lm-eval metrics

    @property
    def checks_passed(self) -> int:
        return sum(r.startswith("pass: ") for r in self.reasons)


# ---------------------------------------------------------------------------------------------
# the run


class RunSummary(Contract):
    """What a run of the retraining flow did, as `lmforge run` prints it."""

    WRITER: ClassVar[str] = "retrain flow"

    outcome: Literal["Promoted", "Rejected", "No change"]
    data_md5: str
    data_url: str
    documents: dict[str, Any]  # documents, kept_documents, dropped_by_reason (None without a report)
    tokens: dict[str, int]
    vocab_size: int
    contamination: dict[str, Any] | None
    metrics: dict[str, Any]
    reasons: list[str]
    head_to_head: dict[str, Any] = {}  # the gate's comparisons on the same bytes (Decision.head_to_head)
    model_url: str | None = None
    bento_tag: str | None = None
    bento_url: str | None = None

    @property
    def promoted(self) -> bool:
        return self.outcome == "Promoted"

    @property
    def no_change(self) -> bool:
        return self.outcome == "No change"
