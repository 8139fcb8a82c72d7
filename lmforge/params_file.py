"""params.yaml: read, with the profile overlay and `-p` overrides applied and validated (load_params),
and written back with the overrides, comments kept (write_overrides), as `dvc exp run -S` does."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from infra.atomic import atomic_open
from lmforge.config import PARAMS_FILE, ConfigError, Params
from lmforge.workspace import find_root


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=50` -> (["train", "max_steps"], 50); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        if err["type"] == "extra_forbidden":
            got = " (unknown key)"
        lines.append(f"  {path}: {err['msg']}{got}")
    return f"{origin}: invalid config\n" + "\n".join(lines)


def resolve_params(
    raw: dict, overrides: list[str] = (), profile: str | None = None, origin: str = PARAMS_FILE
) -> Params:
    """Apply the profile overlay, then the overrides, then validate."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: must be a YAML mapping of sections")
    tree = {k: v for k, v in raw.items() if k != "profiles"}
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{origin}: profiles: must be a mapping of name -> overlay")
    parsed = [parse_override(o) for o in overrides]
    for path, value in parsed:  # a `-p profile=gpu` override picks the profile too
        if path == ["profile"]:
            profile = value
    name = profile or tree.get("profile") or "demo"
    if name not in profiles and name != "demo":
        raise ConfigError(f"profile: unknown profile {name!r}; params.yaml defines {sorted(profiles)}")
    overlay = profiles.get(name) or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"profiles.{name}: must be a mapping")
    tree = _deep_merge(tree, overlay)
    tree["profile"] = name
    for path, value in parsed:
        _set_path(tree, path, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def read_params_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run lmforge inside its workspace, or set LMFORGE_ROOT)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def load_params(root: Path | None = None, overrides: list[str] = (), profile: str | None = None) -> Params:
    path = (root or find_root()) / PARAMS_FILE
    return resolve_params(read_params_file(path), overrides, profile, origin=str(path))


def write_overrides(root: Path, overrides: list[str], profile: str | None = None) -> list[str]:
    """Persist overrides into params.yaml (comments kept), as `dvc exp run -S` does.

    The result is validated before anything is written, so a bad override leaves the file untouched.
    Returns one line per change, for the log.
    """
    from ruamel.yaml import YAML

    path = root / PARAMS_FILE
    all_overrides = list(overrides) + ([f"profile={profile}"] if profile else [])
    resolve_params(read_params_file(path), all_overrides, origin=str(path))
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text())
    changes = []
    for text in all_overrides:
        keys, value = parse_override(text)
        node = doc
        for part in keys[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        old = node.get(keys[-1], "<unset>")
        if old != value:
            node[keys[-1]] = value
            changes.append(f"{'.'.join(keys)}: {old!r} -> {value!r}")
    if changes:
        with atomic_open(path) as fh:
            rt.dump(doc, fh)
    return changes
