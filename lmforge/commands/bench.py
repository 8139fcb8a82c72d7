"""`lmforge bench`: each stage against the bare library doing the same work, as ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.commands.common import Profile, fail, workspace_and_params


def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="A tiny model and short runs (a few minutes)")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Where results.json and results.md go; default: bench/ in the workspace"),
    ] = None,
    corpus: Annotated[
        Path | None, typer.Option(help="A corpus file or dir; default: the builtin corpus")
    ] = None,
    skip_pipeline: Annotated[
        bool, typer.Option("--skip-pipeline", help="Skip the pipeline section (it starts its own S3)")
    ] = False,
    sections: Annotated[
        str, typer.Option(help="Comma-separated: validate,preprocess,train,adapt,serve,vllm,pipeline")
    ] = "validate,preprocess,train,adapt,serve,vllm,pipeline",
    demo_seconds: Annotated[
        float | None, typer.Option(help="Record this `make demo` wall time (timed outside the bench)")
    ] = None,
    profile: Profile = None,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if a figure misses its target, naming each one")
    ] = False,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target", help="Replace a target's value for this run: NAME=VALUE (benchmarks/targets.py)"
        ),
    ] = None,
) -> None:
    """Measure each stage against the bare library doing the same work; write a table of ratios.

    Runs in a temporary workspace of its own: data/, artifacts/, the BentoML store and S3 of this
    workspace are not touched. With --check it exits 1 when a figure misses its target in
    benchmarks/targets.py, with one line per missed target: the figure, its value, the target.
    """
    from benchmarks import SECTIONS, run_bench
    from benchmarks.targets import missed, with_values

    ws, _ = workspace_and_params()
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        fail(f"--sections: unknown {', '.join(unknown)}; choose from {','.join(SECTIONS)}", 2)
    overrides = {}
    for item in target or []:
        name, _, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            fail(f"--target {item}: expected NAME=NUMBER, e.g. train.overhead=0.95", 2)
    try:
        targets = with_values(overrides)
    except KeyError as exc:
        fail(f"--target: {exc.args[0]}", 2)
    skipped = {}
    if skip_pipeline and "pipeline" in chosen:
        chosen.remove("pipeline")
        skipped["pipeline"] = "--skip-pipeline"
    if quick and "vllm" in chosen:
        chosen.remove("vllm")
        skipped["vllm"] = "full mode only (vLLM's servers start in about a minute each)"
    results = run_bench(
        quick,
        out or ws.root / "bench",
        ws.root,
        corpus,
        [s for s in SECTIONS if s in chosen],
        skipped,
        demo_seconds,
        profile,
        targets=targets,
    )
    if check:
        lines = missed(results)
        if lines:
            typer.secho(f"bench --check: {len(lines)} target(s) missed", fg=typer.colors.RED, err=True)
            for line in lines:
                typer.echo(f"  missed {line}", err=True)
            raise typer.Exit(1)
        typer.echo("bench --check: every judged figure met its target")
