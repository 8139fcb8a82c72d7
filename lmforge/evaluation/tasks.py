"""The user's own evaluation tasks (gate.tasks): lm-evaluation-harness task files, run in process on a
saved model through lm-eval's own `hf` model class, and the rule each metric must hold.

A task file is what `lm_eval --include_path` takes: a YAML with `task:`, local data files (paths are
relative to the workspace), and its metrics. lm-eval says whether a metric is better higher or lower.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lmforge.config import ConfigError, TaskRule


def task_names(rules: list[TaskRule], root: Path) -> dict[str, str]:
    """Task file -> the task it defines; a missing or unreadable file is a ConfigError naming it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    names = {}
    for i, rule in enumerate(rules):
        path = root / rule.file
        if not path.is_file():
            raise ConfigError(f"gate.tasks[{i}].file: {rule.file} is not a file in {root}")
        try:
            config = load_yaml(path)
        except Exception as exc:  # noqa: BLE001 - lm-eval's loader raises many kinds; all mean "fix the file"
            raise ConfigError(f"gate.tasks[{i}].file: {rule.file} is not an lm-eval task file ({exc})") from None
        if not isinstance(config.get("task"), str):
            raise ConfigError(f"gate.tasks[{i}].file: {rule.file} names no `task:`")
        names[rule.file] = config["task"]
    return names


def run_tasks(model_dir: Path, rules: list[TaskRule], root: Path, batch_size: int) -> dict[str, dict]:
    """Every listed task on the model: {file: {"task", "metrics": {metric: value}, "higher_is_better"}}."""
    if not rules:
        return {}
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    names = task_names(rules, root)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # task data is local: never wait on a hub
    folders = sorted({str((root / f).parent) for f in names})
    with contextlib.chdir(root):  # the tasks' data_files are relative to the workspace
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=sorted(set(names.values())),
            task_manager=TaskManager(include_path=folders, include_defaults=False),
            device="cuda" if torch.cuda.is_available() else "cpu",
            batch_size=batch_size,
            log_samples=False,
            verbosity="ERROR",
        )
    found = {}
    for file, task in names.items():
        measured = results["results"][task]
        metrics = {key.split(",", 1)[0]: value for key, value in measured.items()
                   if "," in key and not key.split(",", 1)[0].endswith("_stderr")}  # fmt: skip
        found[file] = {"task": task, "metrics": metrics, "higher_is_better": results["higher_is_better"][task]}
    return found


def judge(rule: TaskRule, challenger: dict, champion: dict | None) -> list[tuple[bool, str]]:
    """The rule's checks on one task's results: (passed, reason) each, naming the task and metric."""
    name = f"task {challenger['task']} ({rule.file}) {rule.metric}"
    if rule.metric not in challenger["metrics"]:
        return [(False, f"{name}: lm-eval reported no such metric (it has {', '.join(challenger['metrics'])})")]
    value = challenger["metrics"][rule.metric]
    higher = challenger["higher_is_better"].get(rule.metric, True)
    checks = []
    if rule.threshold is not None:
        ok = value >= rule.threshold if higher else value <= rule.threshold
        sign = (">=" if ok else "<") if higher else ("<=" if ok else ">")
        checks.append((ok, f"{name} {value:.4f} {sign} threshold {rule.threshold:.4f}"))
    if rule.max_drop is not None:
        if champion is None:
            checks.append((True, f"{name} {value:.4f}: no champion to compare with"))
        else:
            theirs = champion["metrics"].get(rule.metric)
            drop = (theirs - value) if higher else (value - theirs)
            ok = drop <= rule.max_drop
            checks.append((ok, f"{name} {value:.4f} against the champion's {theirs:.4f}: "
                               f"{'worse' if drop > 0 else 'no worse'} by {max(drop, 0):.4f} "
                               f"{'<=' if ok else '>'} {rule.max_drop:.4f} allowed"))  # fmt: skip
    return checks
