"""The layering, read from the imports themselves (every import, including those inside functions):

  lmforge (the CLI)  ->  flows, benchmarks  ->  pipeline (the stages, one module each)
      ->  the libraries: lmforge.config (+ params_file, workspace), lmforge.data, lmforge.training,
          lmforge.evaluation, lmforge.runs
      ->  infra (the machinery), lmforge.serving (the Bento)
      ->  lmforge.architecture (what every layer reads from a model's config)

No library imports a stage. lmforge.serving imports nothing first-party but itself and
lmforge.architecture, so the Bento carries exactly those (and serving imports nothing from training). And DVC's view of it: each stage's
code deps in dvc.yaml are exactly the modules the stage imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "pipeline", "flows", "benchmarks", "lmforge")
SERVING = "lmforge.serving"
ARCHITECTURE = "lmforge.architecture"
LIBRARIES = {"lmforge.config", "lmforge.params_file", "lmforge.workspace", "lmforge.data", "lmforge.training",
             "lmforge.evaluation", "lmforge.runs"}  # fmt: skip
# What each layer may import, besides itself and third-party libraries.
ALLOWED = {
    ARCHITECTURE: set(),
    SERVING: {ARCHITECTURE},
    "infra": set(),
    **{library: {"infra", SERVING, ARCHITECTURE} | LIBRARIES for library in LIBRARIES},
    "pipeline": {"infra", SERVING, ARCHITECTURE} | LIBRARIES,
    "flows": {"pipeline", "infra", SERVING, ARCHITECTURE} | LIBRARIES,
    "benchmarks": {"pipeline", "infra", SERVING, ARCHITECTURE} | LIBRARIES,
    "lmforge": {"pipeline", "infra", "flows", "benchmarks", SERVING, ARCHITECTURE} | LIBRARIES,
}


def layer(module: str) -> str:
    """The layer of a dotted module name: lmforge.serving, one of the libraries, else its package."""
    for name in (SERVING, ARCHITECTURE, *LIBRARIES):
        if module == name or module.startswith(name + "."):
            return name
    return module.split(".")[0]


def module_file(name: str) -> Path | None:
    """The first-party file of a dotted module name, or None for a third-party one."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise AssertionError(f"{name} is imported but has no file")


def imports(path: Path) -> set[str]:
    """The first-party modules path imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from lmforge.runs import plan` imports the module lmforge.runs.plan
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if node.module.split(".")[0] in PACKAGES and module_file_or_none(candidate):
                    found.add(candidate)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def module_file_or_none(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def closure(module: str) -> set[Path]:
    """Every first-party file module imports, directly or not, itself included (package __init__ files,
    which hold only a docstring, are left out)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += imports(path)
    return {p for p in seen if p.name != "__init__.py"}


def product_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_package_imports_only_the_layers_below_it(path):
    own = layer(".".join(path.relative_to(REPO).with_suffix("").parts))
    wrong = {name for name in imports(path) if layer(name) not in ALLOWED[own] | {own}}
    assert not wrong, f"{path.relative_to(REPO)} ({own}) may not import {sorted(wrong)}"


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_stages_and_machinery_never_import_prefect():
    """Prefect is the flows' business: the stages, the libraries (the run's plan among them) and the
    machinery run without it."""
    below_flows = {"pipeline", "infra", *LIBRARIES}
    offenders = [
        str(p.relative_to(REPO)) for p in product_files()
        if layer(".".join(p.relative_to(REPO).with_suffix("").parts)) in below_flows
        and "prefect" in third_party_imports(p)
    ]  # fmt: skip
    assert not offenders


def test_package_init_files_hold_no_code():
    """They are left out of the stages' DVC deps, so they must not change what a stage does."""
    for package in PACKAGES:
        for init in (REPO / package).rglob("__init__.py"):
            if package == "benchmarks":
                continue  # not imported by any stage
            body = ast.parse(init.read_text()).body
            assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_dvc_stage_code_deps_are_the_modules_it_imports():
    """A change to any module a stage imports reruns the stage, and a module it does not import does not."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ").split()[0]
        listed = {REPO / d for d in stage["deps"] if d.endswith(".py")}
        imported = closure(module)
        assert listed == imported, (
            f"dvc.yaml stage {name}: missing {sorted(str(p.relative_to(REPO)) for p in imported - listed)}, "
            f"not imported {sorted(str(p.relative_to(REPO)) for p in listed - imported)}"
        )


@pytest.mark.parametrize("bentofile, service", [("bentofile.yaml", "lmforge.serving.service"),
                                                 ("bentofile.vllm.yaml", "lmforge.serving.vllm_service")])  # fmt: skip
def test_the_bento_includes_exactly_the_serving_package(bentofile, service):
    from pipeline.package import service_files

    included = set(service_files(REPO / bentofile))
    package = {str(p.relative_to(REPO)) for p in (REPO / "lmforge" / "serving").glob("*.py")}
    assert included == package | {"lmforge/__init__.py", "lmforge/architecture.py"}
    assert {str(p.relative_to(REPO)) for p in closure(service)} <= included


@pytest.mark.parametrize("module", ["pipeline.validate", "pipeline.preprocess", "flows.retrain"])
def test_the_data_stages_and_the_flow_never_import_torch(module):
    """torch adds about 300 MB to a process's peak memory, which the data stages' bounded-memory budget
    on a large corpus cannot spare; they need no tensors. The flow's process only orchestrates: torch
    and transformers would add some 15 s of imports to every run on a small machine."""
    offenders = sorted(str(p.relative_to(REPO)) for p in closure(module) if "torch" in third_party_imports(p))
    assert not offenders, f"{module} imports torch through {offenders}"
