"""The workspace: where params.yaml, data/ and the generated artifacts live, and the state dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import PARAMS_FILE, ConfigError


def find_root(start: Path | None = None) -> Path:
    """LMFORGE_ROOT, else the nearest directory upwards holding params.yaml and dvc.yaml."""
    if env := os.environ.get("LMFORGE_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / PARAMS_FILE).is_file() and (candidate / "dvc.yaml").is_file():
            return candidate
    raise ConfigError(
        f"no lmforge workspace (params.yaml + dvc.yaml) in {here} or above; cd into one or set LMFORGE_ROOT"
    )


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def find(cls, start: Path | None = None) -> Workspace:
        return cls(find_root(start))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def validation_dir(self) -> Path:
        return self.artifacts / "validation"

    @property
    def tokenizer_dir(self) -> Path:
        return self.artifacts / "tokenizer"

    @property
    def shards_dir(self) -> Path:
        return self.artifacts / "shards"

    @property
    def base_pin(self) -> Path:
        return self.artifacts / "base.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.artifacts / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.artifacts / "model"

    @property
    def train_log(self) -> Path:
        return self.artifacts / "train_log.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.artifacts / "eval"

    @property
    def gate_file(self) -> Path:
        return self.artifacts / "gate.json"

    @property
    def package_dir(self) -> Path:
        return self.artifacts / "package"

    @property
    def state(self) -> Path:
        """Servers' data, pids, logs and generated credentials; git-ignored."""
        return Path(os.environ.get("LMFORGE_STATE_DIR") or self.root / ".lmforge").resolve()
