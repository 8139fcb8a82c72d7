"""Benchmarks: `lmforge bench` measures each stage against the bare library doing the same work.

Every figure is a ratio of two rates measured side by side, in the same process or the same run, each
side REPEATS times, interleaved with the other (A B A B A B): the median of each side, the ratio of the
medians, and the range of each side and of the round-by-round ratios are reported.
  validate    `lmforge validate` on a large single-file JSONL corpus against bare reading and JSON
              decoding of the same file, and its peak RSS per GB of corpus;
  preprocess  the stage's encode pass against raw `tokenizers` encode_batch, same corpus and tokenizer;
  train       the train stage (torchrun, DDP) against a bare forward/backward/AdamW loop with the same
              fused loss, model, batch and process count; the fused loss against the model's own in that
              loop; and both as a fraction of this machine's dense matmul FLOP/s (MFU);
  adapt       adapting a ~200 M-parameter Llama base on 2 ranks: full or LoRA, DDP or FSDP; each rank's
              peak memory and the tokens/s, against full + DDP;
  serve       the Bento over HTTP against a bare KV-cache greedy loop (1 row, and 16 rows against 16
              clients) and `model.generate` in this process;
  vllm        the same model on vLLM against the builtin engine (1, 16 and 64 clients, time to first
              token), and the vLLM Bento against a bare vLLM server (full mode only);
  pipeline    wall times of a first `lmforge run`, a no-change `dvc repro` and a no-change `lmforge run`.
Each section is a module here; harness.py holds what they share, targets.py every target.
Each side keeps its raw numbers (amount, seconds) so any ratio can be recomputed from results.json.

The bench works in a temporary workspace of its own (the builtin corpus, or --corpus), so it never
touches the user's data/, artifacts/, BentoML store or S3. `python -m benchmarks.bare_loop` under
torchrun is the bare training loop (one rank); the bench launches it with the train stage's own launcher.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from benchmarks import adapt, preprocess, serve, train, validate, vllm
from benchmarks import pipeline as pipeline_section  # the section, not the stages' `pipeline` package
from benchmarks.harness import FULL, QUICK, SOURCE_ROOT, Bench, Log, Run, figure, machine, side, write_results
from benchmarks.targets import TARGETS, Target, judge
from lmforge.params_file import load_params, write_overrides
from lmforge.workspace import Workspace

SECTION_RUNS: dict[str, Callable[[Bench], dict]] = {
    "validate": validate.run,
    "preprocess": preprocess.run,
    "train": train.run,
    "adapt": adapt.run,
    "serve": serve.run,
    "vllm": vllm.run,
    "pipeline": pipeline_section.run,
}
SECTIONS = tuple(SECTION_RUNS)  # in the order they run


def run_bench(
    quick: bool,
    out_dir: Path,
    source_root: Path,
    corpus: Path | None = None,
    sections: list[str] | tuple[str, ...] = SECTIONS,
    skipped: dict[str, str] | None = None,
    demo_seconds: float | None = None,
    profile: str | None = None,
    log: Log = print,
    targets: dict[str, Target] = TARGETS,
) -> dict:
    """Run the sections in a temporary workspace; write results.json and results.md into out_dir.
    Each figure is judged against `targets` (the table in benchmarks.targets unless replaced)."""
    from pipeline.ingest import fetch_source

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        tmp = Path(tmp)
        ws = Workspace(tmp / "ws")
        ws.root.mkdir()
        for name in ("params.yaml", "dvc.yaml", "bentofile.yaml"):
            src = source_root / name if (source_root / name).is_file() else SOURCE_ROOT / name
            shutil.copy(src, ws.root / name)
        write_overrides(ws.root, QUICK if quick else FULL, profile)
        source = str(corpus.resolve()) if corpus else "builtin"
        fetch_source(source, ws.data, load_params(ws.root).ingest)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the stages run it
        bench = Bench(ws, quick, tmp, source, source_root, profile, log)
        results: dict = {"mode": "quick" if quick else "full", "sections": {}}
        results["skipped"] = dict(skipped or {})
        for name in sections:
            section_start = time.perf_counter()
            measured = SECTION_RUNS[name](bench)
            results["sections"][name] = {
                key: judge(f"{name}.{key}", f, quick, targets) for key, f in measured.items()
            }
            log(f"{name}: done in {time.perf_counter() - section_start:.0f} s")
        results["params"] = bench.params.model_dump(
            include={"profile", "preprocess", "model", "train", "serve"}
        )
    results["machine"] = machine()  # at the end: the load average then says how busy the run was
    if demo_seconds is not None:
        results["sections"].setdefault("pipeline", {})["demo_given"] = figure(
            "pipeline: full demo (`make demo`), timed outside the bench",
            side("make demo", "", [Run(None, demo_seconds, 0.0, 0.0)]),
            note="given with --demo-seconds",
        )
    results["targets"] = {name: asdict(t) for name, t in targets.items()}  # the table it was judged by
    results["bench_seconds"] = time.perf_counter() - started
    write_results(results, out_dir, log)
    return results
