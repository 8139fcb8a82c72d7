"""Real corpora through the whole flow: `lmforge run --source` on English and Chinese text, in the layouts
and formats people have, with a few bad documents in them. Real SeaweedFS, DVC, Prefect and torchrun.

One workspace for the module; each run replaces the corpus, as a scheduled retrain on new data would.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.s3 import s3_client
from lmforge.params_file import write_overrides

from .conftest import POEM_LINES
from .test_e2e_data import BIN, make_workspace, run, summary_value

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpora_ws(tmp_path_factory, s3_server, prefect_api):
    root = tmp_path_factory.mktemp("e2e-corpora") / "ws"
    root.mkdir()
    ws, env, bucket = make_workspace(root, s3_server, "e2e-corpora", prefect_api)
    # each test brings a new corpus; the gate's contamination bound is the default one (TINY lifts it)
    write_overrides(ws, ["validation.min_fraction_of_champion=0", "gate.max_contamination=0.05"])
    return ws, env, bucket


def artifacts(ws: Path) -> tuple[dict, dict]:
    report = json.loads((ws / "artifacts/validation/report.json").read_text())
    manifest = json.loads((ws / "artifacts/shards/manifest.json").read_text())
    return report, manifest


def trained_documents(manifest: dict) -> int:
    return sum(info["documents"] for info in manifest["splits"].values())


def test_an_s3_prefix_mixing_formats_and_layouts(corpora_ws, s3_server, tmp_path):
    """English documentation as WikiText-style .txt (blank lines of spaces), a .jsonl.gz and a .parquet
    whose text is in `content`, beside a file of another kind, with 2% bad documents."""
    ws, env, bucket = corpora_ws
    names = sorted(topics)
    wiki = "\n \n".join(topics[k].replace("\n\n", "\n \n") for k in names[:40])
    records = [{"id": i, "content": topics[k]} for i, k in enumerate(names[40:])]
    records[5]["content"] = "\x00\x07" * 300  # a binary record
    source = tmp_path / "mixed"
    source.mkdir()
    (source / "a_reference.txt").write_text(wiki)
    (source / "b_topics.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in records[:20]).encode())
    )
    pq.write_table(pa.table({"content": [r["content"] for r in records[20:]]}), source / "c_topics.parquet")
    (source / "notes.csv").write_text("not,a,corpus\n")
    client = s3_client(s3_server.cfg, s3_server.state)
    for path in source.iterdir():
        client.upload_file(str(path), bucket, f"incoming/mixed/{path.name}")

    result = run(
        [
            BIN / "lmforge",
            "run",
            "--source",
            f"s3://{bucket}/incoming/mixed",
            "-p",
            "ingest.text_field=content",
        ],
        ws,
        env,
        timeout=900,
    )
    report, manifest = artifacts(ws)
    assert sorted(p.name for p in (ws / "data").iterdir()) == sorted(p.name for p in source.iterdir())
    assert [(f["file"], f["format"], f["layout"]) for f in report["files"]] == [
        ("a_reference.txt", ".txt", "paragraphs"),
        ("b_topics.jsonl.gz", ".jsonl.gz", None),
        ("c_topics.parquet", ".parquet", None),
    ]
    assert report["skipped"] == ["notes.csv"]
    stats = report["stats"]
    # the binary record is dropped; so are documents the real text repeats (pydoc repeats a few topics)
    assert report["success"] and stats["dropped_by_reason"]["nonprintable"] == 1
    assert set(stats["dropped_by_reason"]) <= {"nonprintable", "duplicate"}
    assert stats["files"] == 3 and report["files"][0]["documents"] > 20  # the .txt became many documents
    dropped = [json.loads(d) for d in (ws / "artifacts/validation/dropped.jsonl").read_text().splitlines()]
    assert {d["source"] for d in dropped if d["reason"] == "nonprintable"} == {"b_topics.jsonl.gz#5"}
    assert trained_documents(manifest) == stats["kept_documents"] == stats["documents"] - len(dropped)
    by_reason = ", ".join(f"{k} {v:,}" for k, v in stats["dropped_by_reason"].items())
    kept = summary_value(result.stdout, "documents")
    assert kept == f"{stats['kept_documents']:,} kept of {stats['documents']:,} (dropped: {by_reason})"
    leak = manifest["contamination"]
    assert summary_value(result.stdout, "contamination").startswith(f"{leak['val']:.2%} of val")


def test_chinese_poems_with_private_use_glyphs_train(corpora_ws, tmp_path):
    """A JSONL of classical poems in a `content` field; 0.5% of them hold private-use characters (rare
    glyphs), which are dropped while the rest is trained on."""
    ws, env, _ = corpora_ws
    poems = []
    for i in range(3000):
        lines = [POEM_LINES[(i * 3 + k) % len(POEM_LINES)] for k in range(1 + i % 3)]
        poem = "\n".join(lines) + f"\n（其{i}）"
        if i % 200 == 7:  # 15 of 3,000
            poem = poem[:6] + "\ue0a5\ue0b1\ue0c3" + poem[6:]
        poems.append({"title": f"第{i}首", "author": "佚名", "content": poem})
    source = tmp_path / "poems.jsonl"
    source.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in poems))
    result = run([BIN / "lmforge", "run", "--source", source], ws, env, timeout=900)
    report, manifest = artifacts(ws)
    stats = report["stats"]
    assert report["success"] and stats["dropped_by_reason"] == {"nonprintable": 15}
    assert trained_documents(manifest) == stats["kept_documents"] == 2985
    assert manifest["splits"]["train"]["tokens"] > 50_000
    # these poems reuse the same few lines, so val and test 13-grams are in train: the gate says so
    leak = manifest["contamination"]
    assert min(leak["val"], leak["test"]) > 0.05
    gate = json.loads((ws / "artifacts/gate.json").read_text())
    assert not gate["promote"] and "REJECTED" in result.stdout
    worst = max(("val", "test"), key=leak.get)
    expected = f"FAIL: contamination {leak[worst]:.2%} of {worst} word n-grams seen in train > 5.00%: "
    assert any(reason.startswith(expected) for reason in gate["reasons"]), gate["reasons"]


def test_a_run_on_the_ray_engine_then_on_the_local_one_reruns_no_stage(corpora_ws, tmp_path):
    """`lmforge run -p data.engine=ray`: ingest's check and the DVC stages validate and preprocess run
    on a Ray cluster of their own. Switching back to the local engine reruns no stage: the outputs would be the same bytes,
    so data.* is not a stage param."""
    ws, env, _ = corpora_ws
    source = tmp_path / "docs"
    source.mkdir()
    names = sorted(topics)
    for i, name in enumerate(names[::3]):  # a corpus of its own: the other tests' runs left theirs
        (source / f"{i:03d}_{name.replace(' ', '_')}.md").write_text(topics[name])
    result = run([BIN / "lmforge", "run", "--source", source, "-p", "data.engine=ray"], ws, env, timeout=900)
    output = result.stdout + result.stderr
    # a local cluster of its own for each: ingest's check of the staged corpus, validate, preprocess
    assert output.count("data.engine=ray: started a local Ray cluster at 127.0.0.1:") == 3, output[-4000:]
    report, manifest = artifacts(ws)
    assert report["success"] and report["stats"]["files"] == len(names[::3])
    assert trained_documents(manifest) == report["stats"]["kept_documents"]
    again = run([BIN / "lmforge", "run", "--source", source, "-p", "data.engine=local"], ws, env, timeout=900)
    output = again.stdout + again.stderr
    for stage in ("validate", "preprocess", "train"):
        assert f"stage {stage} is up to date (dvc status): skipped" in output, output[-4000:]
    assert "data.engine=ray" not in output
