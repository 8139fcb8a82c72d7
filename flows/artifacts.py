"""Prefect artifacts of a retraining run: what a person reads in the UI's Artifacts tab.

Each has a fixed key, so the UI also shows its history across runs.
"""

from __future__ import annotations

import base64
import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from pipeline.config import Workspace
from pipeline.contracts import ChampionRecord, Decision, read_curve, read_metrics


def validation(ws: Workspace) -> None:
    report = ws.validation_dir / "report.md"
    if report.is_file():
        create_markdown_artifact(report.read_text(), key="validation-report", description="Corpus validation")


def metrics(ws: Workspace) -> None:
    m = read_metrics(ws.eval_dir)
    rows = [
        {"split": split, "model": m[f"{split}_perplexity"], "bigram": m[f"bigram_{split}_perplexity"],
         "unigram": m[f"unigram_{split}_perplexity"], "tokens": m[f"{split}_tokens"],
         "contamination": m.get(f"{split}_contamination")}
        for split in ("val", "test")
    ]  # fmt: skip
    rows.append({"split": "throughput (tokens/s)", "model": m.get("train_tokens_per_s"), "bigram": None,
                 "unigram": None, "tokens": m.get("eval_tokens_per_s"), "contamination": None})  # fmt: skip
    create_table_artifact(
        rows,
        key="metrics",
        description="Perplexity against the n-gram baselines, lower is better; contamination is the share of "
        "the split's 13-grams that also occur in train",
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
        "val perplexity": record.metrics.get("val_perplexity"),
        "test perplexity": record.metrics.get("test_perplexity"),
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


COMPARED = ["val_perplexity", "test_perplexity", "bigram_val_perplexity", "val_contamination", "test_contamination",
            "train_tokens_per_s"]  # fmt: skip


def comparison(ws: Workspace, decision: Decision) -> None:
    """Challenger against champion: the metrics side by side and both loss curves in one picture."""
    from pipeline.plots import plot_curves

    challenger, champion = decision.challenger, decision.champion
    theirs = champion.metrics if champion else {}
    rows = ["| metric | challenger | champion |", "|---|---|---|"]
    rows += [f"| {key} | {challenger.get(key, '—')} | {theirs.get(key, '—')} |" for key in COMPARED]
    curves = {"challenger": read_curve(ws.eval_dir)}
    if champion and champion.loss_curve:
        curves["champion"] = champion.loss_curve
    png = ws.eval_dir / "comparison.png"
    plot_curves(curves, png, "challenger against champion")
    data = base64.b64encode(png.read_bytes()).decode()
    png.unlink()  # a picture for the UI only: not a DVC out
    head = f"# Challenger against champion `{champion.bento_tag}`" if champion else "# No champion yet"
    create_markdown_artifact(
        f"{head}\n\n" + "\n".join(rows) + f"\n\n![loss curves](data:image/png;base64,{data})\n",
        key="comparison",
        description="The challenger's metrics and loss curves beside the champion's",
    )
