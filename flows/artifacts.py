"""Prefect artifacts of a retraining run: what a person reads in the UI's Artifacts tab.

Each has a fixed key, so the UI also shows its history across runs.
"""

from __future__ import annotations

import base64
import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from lmforge.runs.contracts import ChampionRecord, Decision, read_curve, read_metrics
from lmforge.workspace import Workspace


def validation(ws: Workspace) -> None:
    report = ws.validation_dir / "report.md"
    if report.is_file():
        create_markdown_artifact(report.read_text(), key="validation-report", description="Corpus validation")


def metrics(ws: Workspace) -> None:
    m = read_metrics(ws.eval_dir)
    rows = [
        {"split": split, "model": m[f"{split}_bits_per_byte"], "bigram": m[f"bigram_{split}_bits_per_byte"],
         "unigram": m[f"unigram_{split}_bits_per_byte"], "base": m.get(f"base_{split}_bits_per_byte"),
         "perplexity per token": m[f"{split}_perplexity"], "bytes": m[f"{split}_bytes"],
         "contamination": m.get(f"{split}_contamination")}
        for split in ("val", "test")
    ]  # fmt: skip
    create_table_artifact(
        rows,
        key="metrics",
        description="Bits per byte on the held-out text against the n-gram baselines (and a fine-tune's base), "
        "lower is better; perplexity per token holds for this tokenizer only; contamination is the share of "
        "the split's word 13-grams that also occur in train",
    )


def loss_curve(ws: Workspace) -> None:
    """The PNG inlined as a data URI: the UI shows it with no file server behind it."""
    png = ws.eval_dir / "loss_curve.png"
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        create_markdown_artifact(
            f"![training and validation loss](data:image/png;base64,{data})",
            key="loss-curve",
            description="Training and validation loss (nats/token)",
        )


def gate(decision: Decision) -> None:
    verdict = "PROMOTE" if decision.promote else "REJECT"
    lines = [f"# Gate: {verdict}", ""] + [f"- {r}" for r in decision.reasons]
    create_markdown_artifact(
        "\n".join(lines), key="gate-decision", description="The gate's decision and reasons"
    )


def bento(record: ChampionRecord) -> None:
    text = (
        f"# Bento `{record.bento_tag}`\n\n- exported to `{record.bento_url}`\n"
        f"- serve it: `lmforge serve {record.bento_tag}`\n"
    )
    create_markdown_artifact(text, key="bento", description="The packaged, promoted model")


def lineage(record: ChampionRecord) -> None:
    """Everything that says where the champion came from, on the flow run that made it."""
    rows = {
        "bento": record.bento_tag,
        "data md5": record.data_md5,
        "git sha": record.git_sha,
        "params hash": (record.lineage or {}).get("params_hash"),
        "profile": record.profile,
        "val bits per byte": record.metrics.get("val_bits_per_byte"),
        "test bits per byte": record.metrics.get("test_bits_per_byte"),
        "model md5": record.model_md5,
        "flow run": str(flow_run.id),
        "promoted at": record.promoted_at,
    }
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | `{v}` |" for k, v in rows.items())
    params = json.dumps(record.params, indent=2)
    create_markdown_artifact(
        f"# Lineage\n\n{table}\n\n## Params\n\n```json\n{params}\n```\n",
        key="lineage",
        description="Lineage of the promoted model",
    )


def comparison(ws: Workspace, decision: Decision) -> None:
    """Challenger against champion on this run's held-out bytes, each with its own tokenizer, and both loss
    curves in one picture (the curves are per token of each model's own tokenizer)."""
    from lmforge.evaluation.plots import plot_curves

    champion = decision.champion
    rows = ["| on this run's text | challenger | other | difference | interval |", "|---|---|---|---|---|"]
    for against, by_split in decision.head_to_head.items():
        for split, c in by_split.items():
            low, high = c["interval"]
            rows.append(f"| {split} bits/byte vs {against} | {c['challenger_bits_per_byte']} | {c['other_bits_per_byte']} "
                        f"| {c['relative_difference']:+.2%} | {low:+.2%} to {high:+.2%} ({c['confidence']:.0%}) |")  # fmt: skip
    for who, results in decision.tasks.items():
        for found in results.values():
            rows += [f"| task {found['task']} {k} ({who}) | {v} | | | |" for k, v in found["metrics"].items()]
    curves = {"challenger": read_curve(ws.eval_dir)}
    if champion and champion.loss_curve:
        curves["champion"] = champion.loss_curve
    png = ws.eval_dir / "comparison.png"
    plot_curves(curves, png, "challenger against champion (nats per token of each one's tokenizer)")
    data = base64.b64encode(png.read_bytes()).decode()
    png.unlink()  # a picture for the UI only: not a DVC out
    head = f"# Challenger against champion `{champion.bento_tag}`" if champion else "# No champion yet"
    table = "\n".join(rows) + "\n\n" if len(rows) > 2 else ""
    create_markdown_artifact(
        f"{head}\n\n{table}![loss curves](data:image/png;base64,{data})\n",
        key="comparison",
        description="The challenger against the champion on the same held-out bytes, and both loss curves",
    )
