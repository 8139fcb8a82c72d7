"""Shared fixtures: an offline, quiet environment and one real SeaweedFS server per test session."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.storage import PORT_OFFSETS, EmbeddedS3, port_is_free

# Set before anything imports prefect, transformers or bentoml.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    BENTOML_DO_NOT_TRACK="true",
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
    TOKENIZERS_PARALLELISM="false",
)


def free_port_block(size: int = len(PORT_OFFSETS)) -> int:
    """The first port of `size` consecutive free loopback ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        if all(port_is_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports found")


@dataclass
class S3Server:
    cfg: StorageConfig
    state: Path
    server: EmbeddedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    state = tmp_path_factory.mktemp("lmforge-state")
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port_block()}", bucket="lmforge-test")
    server = EmbeddedS3(cfg, state)
    server.start()
    yield S3Server(cfg, state, server)
    server.stop()
