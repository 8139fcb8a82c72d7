"""The Ray engine (`data.engine: ray`): validate's and preprocess's per-document work on a Ray cluster.

With Ray Data, in three operators that stream into each other:
  files -> documents   one read task per file, with lmforge/data/corpus.py's readers, so a document is
                       exactly the local engine's (formats, layouts, sources, U+FFFD)
  documents -> facts   FactFinder, or the tokenizer's encode_batch, on each batch of data.ray_batch_docs
                       documents, in the same task (Ray fuses the two), on every CPU
  -> the driver        in corpus order (preserve_order), where the stage makes its sequential decisions

The cluster: `data.ray_address`, else RAY_ADDRESS, else a cluster of this machine started for the stage
and stopped after it. That one runs in Ray's single-machine mode, so every port it opens is on 127.0.0.1,
with no dashboard. On a cluster of several machines the workers read the files themselves: a local
corpus must be at the same path on every node, and an S3 corpus (open_corpus(root, fs)) is read from S3
by each task.

Text travels as UTF-8 bytes with surrogatepass: a lone surrogate from a JSON escape is a document's
content (the filter counts it), and Arrow strings could not hold it. A CorpusError in a task (a truncated
file, a bad record) comes back as a row holding its message, in its place in the order, and is raised
again on the driver, so the stage names the file as the local engine does.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lmforge.config import ConfigError, DataConfig, IngestConfig, Params, ValidationConfig
from lmforge.data.corpus import Corpus
from lmforge.data.documents import DocumentFacts, FactFinder, KeepPlan, kept_text
from lmforge.data.formats import CorpusError, CorpusFile, read_file_documents

# Ray's single-machine mode (what it uses on macOS): node address 127.0.0.1, so GCS, raylet, workers
# and the object manager listen on loopback only. Read by Ray at import, so it is set before.
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

FACT_SCHEMA = pa.schema(
    [
        ("file", pa.int32()),
        ("index", pa.int64()),
        ("source", pa.string()),
        ("utf8_ok", pa.bool_()),
        ("blank", pa.bool_()),
        ("chars", pa.int64()),
        ("whole", pa.uint64()),
        ("keys", pa.list_(pa.uint64())),
        ("paragraph_chars", pa.list_(pa.int64())),
        ("paragraph_nonprintable", pa.list_(pa.int64())),
        ("nonprintable", pa.int64()),
        ("secret_counts", pa.list_(pa.int64())),
        ("secret_examples", pa.list_(pa.string())),
        ("snippet", pa.string()),
        ("bad_char", pa.string()),
        ("digest", pa.binary()),
        ("text", pa.binary()),
        ("problem", pa.string()),
        ("problem_detail", pa.string()),
        ("error", pa.string()),
    ]
)
FACT_FIELDS = [f.name for f in fields(DocumentFacts)]


class RayEngine(AbstractContextManager):
    name = "ray"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.started = False  # whether this engine started the cluster (and so stops it)
        self.context = None  # what ray.init returned, when this engine connected
        self.stats: list[str] = []  # Ray Data's execution summary of each pass (tasks, rows, times)

    def __enter__(self) -> RayEngine:
        address = self.cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if not address:
            for key, value in SINGLE_MACHINE.items():
                os.environ.setdefault(key, value)
        import ray
        import ray.data

        if address and not ray.is_initialized():
            _check_reachable(address)
        if not ray.is_initialized():
            # Ray runs one task per CPU, so the tokenizer's own thread pool would only oversubscribe them
            env: dict = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
            common = {"log_to_driver": False, "logging_level": logging.WARNING}
            try:
                if address:
                    # the workers import lmforge's own modules: ship them, so any cluster can run them
                    here = Path(__file__).resolve().parents[2]  # the repository root
                    env["py_modules"] = [str(here / name) for name in ("pipeline", "infra", "lmforge")]
                    self.context = ray.init(address=address, runtime_env=env, **common)
                else:
                    self.context = ray.init(
                        address="local", num_cpus=self.cfg.ray_cpus, include_dashboard=False,
                        runtime_env=env, **common,
                    )  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = address or "a new local cluster"
                hint = ""
                if address and not os.environ.get("RAY_AUTH_MODE"):
                    # Ray enables token auth on the clusters it starts, but a client given an address
                    # sends its token only when asked to
                    hint = (
                        "; if the cluster uses token auth (the default of `ray start`), set "
                        "RAY_AUTH_MODE=token, with the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
                    )
                raise ConfigError(
                    f"data.engine=ray: cannot reach the Ray cluster at {where} ({exc}){hint}"
                ) from None
            self.started = True
        how = "connected to" if address else "started a local" if self.started else "using the"
        print(
            f"data.engine=ray: {how} Ray cluster at {ray.get_runtime_context().gcs_address} "
            f"({len(ray.nodes())} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs)",
            file=sys.stderr,
        )
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": by us
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the stage's decisions depend on the corpus order
        ctx.enable_progress_bars = False  # the stage shows its own, in documents
        ctx.max_errored_blocks = 0
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    # -----------------------------------------------------------------------------------------
    # the three passes

    def facts(self, corpus: Corpus, params: Params) -> Iterator[DocumentFacts]:
        # batch_size=None: each table the read yields, as it comes. Ray fuses this map into the read
        # task and bundles that task's input to the larger batch size, so a number here would put many
        # files in one task and run them one after another.
        ds = self._documents(corpus, params.ingest, None).map_batches(
            _measure, fn_kwargs={"cfg": params.validation, "ingest": params.ingest}, batch_size=None,
            batch_format="pyarrow", zero_copy_batch=True,
        )  # fmt: skip
        counts, layouts = [0] * len(corpus.files), {}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for facts in facts_from_table(batch):
                counts[facts.file] += 1
                yield facts
            files, layout = batch.column("file").to_pylist(), batch.column("layout").to_pylist()
            layouts.update(zip(files, layout, strict=True))
        self.stats.append(ds.stats())
        for file, cf in enumerate(corpus.files):  # what the local reader records on each file
            cf.documents, cf.layout = counts[file], layouts.get(file, cf.layout)

    def kept_texts(self, corpus: Corpus, params: Params, plan: KeepPlan) -> Iterator[str]:
        if not plan.count():
            return
        ds = self._documents(corpus, params.ingest, plan)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            texts, errors = batch.column("text").to_pylist(), batch.column("error").to_pylist()
            for text, error in zip(texts, errors, strict=True):
                _raise_error({"error": error})
                yield text.decode("utf-8", "surrogatepass")
        self.stats.append(ds.stats())

    def token_ids(
        self, corpus: Corpus, params: Params, plan: KeepPlan, tokenizer: Any
    ) -> Iterator[np.ndarray]:
        import ray

        if not plan.count():
            return
        ds = self._documents(corpus, params.ingest, plan).map_batches(
            _encode, fn_kwargs={"tokenizer_ref": ray.put(tokenizer.to_str())},
            batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        )  # fmt: skip
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for error in batch.column("error").drop_null().to_pylist():
                _raise_error({"error": error})
            ids = batch.column("ids").combine_chunks()
            offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
            for i in range(len(ids)):
                yield values[offsets[i] : offsets[i + 1]]
        self.stats.append(ds.stats())

    def _documents(self, corpus: Corpus, cfg: IngestConfig, plan: KeepPlan | None):
        """One read task per file (of those the plan keeps any documents of), streaming its documents."""
        import ray.data

        items = [
            {"file": i, **_plan_columns(plan, i)}
            for i in range(len(corpus.files))
            if plan is None or plan.count(i)
        ]  # never empty: a corpus has files, and a plan is read only when it keeps a document
        files = ray.put(corpus.files)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_files, fn_kwargs={"files_ref": files, "cfg": cfg, "batch_docs": self.cfg.ray_batch_docs},
            batch_size=1, batch_format="pyarrow",
        )  # fmt: skip


def _check_reachable(address: str) -> None:
    """Fail at once on an address nothing listens on: ray.init would retry for minutes first."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", or a form Ray resolves itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ConfigError(
            f"data.engine=ray: cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
            "start one with `ray start --head`, or unset RAY_ADDRESS and data.ray_address for a local one"
        ) from None


def _plan_columns(plan: KeepPlan | None, file: int) -> dict:
    if plan is None:
        return {"indices": None, "fresh": None}
    kept = plan.kept[file]
    return {"indices": list(kept), "fresh": list(kept.values())}


def facts_from_table(table: pa.Table) -> Iterator[DocumentFacts]:
    """The driver's side of the facts pass: each row a task measured, as DocumentFacts."""
    for row in table.to_pylist():
        _raise_error(row)
        if row["text"] is not None:
            row["text"] = row["text"].decode("utf-8", "surrogatepass")
        yield DocumentFacts(**{k: row[k] for k in FACT_FIELDS})


def _raise_error(row: dict) -> None:
    if row.get("error"):
        raise CorpusError(row["error"])


# ---------------------------------------------------------------------------------------------
# what runs in the tasks


@lru_cache(maxsize=4)
def _get(ref) -> Any:  # an object every task of a pass shares, fetched once per worker process
    import ray

    return ray.get(ref)


def _read_files(items: pa.Table, files_ref, cfg: IngestConfig, batch_docs: int) -> Iterator[pa.Table]:
    """Each file's documents (those the plan keeps, with their kept text), as tables of batch_docs rows."""
    files: list[CorpusFile] = _get(files_ref)
    for item in items.to_pylist():
        file = item["file"]
        cf = files[file]
        wanted = None if item["indices"] is None else dict(zip(item["indices"], item["fresh"], strict=True))
        batch = _DocumentBatch(file)
        try:
            for index, doc in enumerate(read_file_documents(cf, cfg)):
                if wanted is None:
                    batch.add(index, doc.source, doc.utf8_ok, doc.text)
                elif index in wanted:
                    batch.add(index, doc.source, doc.utf8_ok, kept_text(doc.text, wanted[index]))
                if len(batch) == batch_docs:
                    yield batch.table(cf.layout)
                    batch = _DocumentBatch(file)
        except CorpusError as exc:
            error = _DocumentBatch(file)
            error.add(-1, cf.rel, True, "")
            yield from (batch.table(cf.layout), error.table(cf.layout, str(exc)))
            continue
        if len(batch):
            yield batch.table(cf.layout)


class _DocumentBatch:
    """Columns of documents read from one file, turned into an Arrow table."""

    def __init__(self, file: int):
        self.file, self.index, self.source, self.utf8_ok, self.text = file, [], [], [], []

    def __len__(self) -> int:
        return len(self.index)

    def add(self, index: int, source: str, utf8_ok: bool, text: str) -> None:
        self.index.append(index)
        self.source.append(source)
        self.utf8_ok.append(utf8_ok)
        self.text.append(text.encode("utf-8", "surrogatepass"))

    def table(self, layout: str | None, error: str | None = None) -> pa.Table:
        n = len(self)
        return pa.table(
            {
                "file": pa.array([self.file] * n, pa.int32()),
                "index": pa.array(self.index, pa.int64()),
                "source": pa.array(self.source, pa.string()),
                "utf8_ok": pa.array(self.utf8_ok, pa.bool_()),
                "text": pa.array(self.text, pa.binary()),
                "layout": pa.array([layout] * n, pa.string()),
                "error": pa.array([error] * n, pa.string()),
            }
        )


def _measure(batch: pa.Table, cfg: ValidationConfig, ingest: IngestConfig) -> pa.Table:
    from lmforge.data.formats import Document

    find, rows = _fact_finder(cfg.model_dump_json(), ingest.model_dump_json()), []
    for row in batch.to_pylist():
        if row["error"]:
            rows.append({**{k: None for k in FACT_SCHEMA.names}, "file": row["file"], "error": row["error"]})
            continue
        doc = Document(row["source"], row["text"].decode("utf-8", "surrogatepass"), row["utf8_ok"])
        facts = find(doc, row["file"], row["index"]).__dict__
        if facts["text"] is not None:
            facts["text"] = facts["text"].encode("utf-8", "surrogatepass")
        rows.append({**facts, "error": None})
    table = pa.Table.from_pylist(rows, schema=FACT_SCHEMA)
    return table.append_column("layout", batch.column("layout"))


@lru_cache(maxsize=2)
def _fact_finder(cfg_json: str, ingest_json: str) -> FactFinder:
    return FactFinder(ValidationConfig.model_validate_json(cfg_json), IngestConfig.model_validate_json(ingest_json))


def _encode(batch: pa.Table, tokenizer_ref) -> pa.Table:
    tokenizer = _tokenizer(tokenizer_ref)
    texts = [t.decode("utf-8", "surrogatepass") for t in batch.column("text").to_pylist()]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int32, len(encodings))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    values = np.fromiter((i for e in encodings for i in e.ids), np.uint32, int(offsets[-1]))
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table({"ids": ids, "error": batch.column("error")})


@lru_cache(maxsize=2)
def _tokenizer(ref):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_get(ref))
