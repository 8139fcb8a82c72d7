"""Ingest: a source (builtin, a local file or dir, or s3://bucket/prefix) -> the corpus in data/.

The source is copied as it is: data/ is the versioned raw corpus, and validate records what it drops.
Reading it (formats, layouts) is lmforge/data/corpus.py, shared with validate and preprocess.

A new corpus is staged next to data/, validated there, and only then swapped in: bad input never
replaces a good corpus.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.atomic import replace_dir
from lmforge.config import IngestConfig
from lmforge.data.corpus import Corpus, open_corpus, walk_files
from lmforge.data.formats import CorpusError

# ---------------------------------------------------------------------------------------------
# the builtin corpora: Python's own documentation, always present, built the same way every time

BUILTIN_CORPORA = {
    "builtin": "builtin_corpus.py",  # text: the standard library's docstrings and sources
    "builtin-chat": "builtin_chat_corpus.py",  # conversations (ingest.format chat): questions on it, answered
}


def write_builtin_corpus(dest: Path, name: str = "builtin") -> None:
    """Build it in a fresh, isolated interpreter: docstrings of C modules depend on what else a process
    has imported or patched (Prefect does), and the dataset md5 must not."""
    import lmforge.data

    script = Path(lmforge.data.__file__).with_name(BUILTIN_CORPORA[name])
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script), str(dest)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise CorpusError(f"building the {name} corpus failed:\n{result.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------------
# fetching a source into a staging directory, then swapping it in


def fetch_source(source: str, dest: Path, cfg: IngestConfig, storage=None) -> None:
    """Copy the corpus named by source into dest (an empty directory)."""
    if source in BUILTIN_CORPORA:
        write_builtin_corpus(dest / source, source)
    elif source.startswith("s3://"):
        from infra.s3 import download_prefix

        if storage is None:
            raise CorpusError("an s3:// source needs the storage config")
        download_prefix(source, dest, *storage)
    else:
        src = Path(source).expanduser()
        open_corpus(src)  # the source is readable (and has something to read) before anything is copied
        for path in walk_files(src) if src.is_dir() else [src]:
            rel = path.relative_to(src) if src.is_dir() else Path(path.name)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
    open_corpus(dest)  # an s3 prefix or directory with nothing readable in it fails here


@contextmanager
def readable_source(source: str, params, state: Path) -> Iterator[Path | Corpus]:
    """A source as validation reads it, data/ untouched: a local path as it is; an s3:// prefix opened in
    place when the Ray engine reads it (each task reads S3 itself), else fetched into a scratch
    directory as ingest fetches it; a builtin corpus written there."""
    if source.startswith("s3://") and params.data.engine == "ray":
        from infra.s3 import arrow_filesystem, parse_s3_uri

        bucket, prefix = parse_s3_uri(source)
        yield open_corpus(f"{bucket}/{prefix}".rstrip("/"), arrow_filesystem(params.storage, state))
    elif source.startswith("s3://") or source in BUILTIN_CORPORA:
        with tempfile.TemporaryDirectory(prefix="lmforge-validate-") as scratch:
            fetch_source(source, Path(scratch), params.ingest, (params.storage, state))
            yield Path(scratch)
    else:
        yield Path(source).expanduser()


def stage_corpus(source: str, data_dir: Path, cfg: IngestConfig, storage=None) -> Path:
    """Fetch the source into a fresh staging dir beside data_dir (same filesystem, so the swap is a rename)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".data-staging-", dir=data_dir.parent))
    try:
        fetch_source(source, staging, cfg, storage)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def same_tree(a: Path, b: Path) -> bool:
    """True when the two directories hold the same files with the same bytes."""
    if not b.is_dir():
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / rel, b / rel, shallow=False) for rel in files_a)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def champion_chars(ws, params) -> int | None:
    """How many characters the champion was trained on (its record keeps the validation stats), or None
    when there is no champion, the record predates the stats, or the shrink guard is off."""
    if params.validation.min_fraction_of_champion <= 0:
        return None
    from lmforge.runs.registry import read_champion

    champion = read_champion(params.storage, ws.state)
    return (champion.data_stats or {}).get("total_chars") if champion else None


def ingest(source: str, ws, params, on_line=print) -> str:
    """source -> staged -> validated -> data/ -> `dvc add data`; returns the dataset md5.

    A source that fails validation (including the shrink guard against the champion's corpus) is
    discarded before data/ is touched.
    """
    from infra.dvc import data_md5, dvc
    from lmforge.data.validation_report import format_failure, format_summary
    from pipeline.validate import validate_corpus

    reference = champion_chars(ws, params)
    staging = stage_corpus(source, ws.data, params.ingest, (params.storage, ws.state))
    try:
        if same_tree(staging, ws.data) and data_md5(ws.root):
            # The corpus in data/ passed this suite when it came in, and the validate stage re-checks it
            # whenever the validation params change: a scheduled rerun on unchanged data skips GE here.
            on_line("source unchanged: data/ already holds exactly this corpus")
            record_source(source, ws, params, on_line)
            return data_md5(ws.root)
        report = validate_corpus(staging, params, name=source, champion_chars=reference)
        for line in format_summary(report).splitlines():
            on_line(line)
        if not report.success:
            raise CorpusError(
                f"source {source} failed validation; data/ is unchanged\n{format_failure(report)}"
            )
        replace_dir(staging, ws.data)
    finally:
        discard(staging)
    dvc(["add", "--quiet", "data"], ws.root, on_line)
    record_source(source, ws, params, on_line)
    return data_md5(ws.root)


def record_source(source: str, ws, params, on_line=print) -> None:
    """The source data/ now holds goes into params.yaml (ingest.source), as -p does: the next run, a
    schedule and `dvc repro` then ingest the data the user chose, never the default in its place. A
    local path is recorded absolute. Nothing is written when the params (their profile's, say) already
    name it. (No stage depends on ingest.source: recording it reruns nothing.)"""
    from lmforge.params_file import write_overrides

    remote = source in BUILTIN_CORPORA or source.startswith("s3://")
    value = source if remote else str(Path(source).expanduser().resolve())
    if value == params.ingest.source:
        return
    for change in write_overrides(ws.root, [f"ingest.source={json.dumps(value)}"]):
        on_line(f"params.yaml: {change}")


def restore_data(ws, on_line=print) -> str | None:
    """A fresh clone has data.dvc but no data/: fetch the dataset from the remote, or, when the remote
    does not have it and it is a builtin corpus (ingest.source), rebuild that (it is the same bytes every
    time). Returns how data/ was restored, or None when there was nothing to do."""
    from infra.dvc import dvc
    from infra.processes import CommandError
    from lmforge.params_file import load_params

    pointer = ws.root / "data.dvc"
    if ws.data.exists() or not pointer.is_file():
        return None
    try:
        dvc(["pull", "--quiet", "data.dvc"], ws.root, on_line)
        return "pulled from the DVC remote"
    except CommandError:
        pass  # not in this remote (a new one, as on a fresh machine's embedded S3)
    recorded = pointer.read_text()
    source = load_params(ws.root).ingest.source
    builtin = source if source in BUILTIN_CORPORA else "builtin"
    fetch_source(builtin, ws.data, None)  # the layout `lmforge ingest --source builtin` makes
    dvc(["add", "--quiet", "data"], ws.root, on_line)
    if pointer.read_text() != recorded:  # data.dvc named some other corpus: put it back, say so
        pointer.write_text(recorded)
        shutil.rmtree(ws.data)
        raise CorpusError(
            "data.dvc names a dataset that is neither in the DVC remote nor a builtin corpus: "
            "`dvc pull` it from the remote that has it, or `lmforge ingest --source SRC`"
        )
    dvc(["push", "--quiet", "data.dvc"], ws.root, on_line)
    return f"rebuilt from the {builtin} corpus (the remote did not have it) and pushed"
