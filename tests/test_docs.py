"""The docs hold together: every relative link in README.md and docs/ names a file that exists and, for
a page, an anchor one of its headings makes; and the front page stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FRONT_PAGE_LINES = 250


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def parsed(page: Path) -> tuple[set[str], list[str]]:
    """The anchors a page's headings make, and the targets of its links."""
    tokens = MarkdownIt().parse(page.read_text())
    anchors = {anchor(tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"}
    links = [
        child.attrs["href"]
        for t in tokens
        if t.type == "inline"
        for child in t.children or []
        if child.type == "link_open"
    ]
    return anchors, links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(page):
    broken = []
    for href in parsed(page)[1]:
        if re.match(r"^[a-z]+:", href):  # http(s), mailto: not this repository's
            continue
        path, _, fragment = href.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{href}: no {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
        elif fragment and target.suffix == ".md" and fragment not in parsed(target)[0]:
            broken.append(f"{href}: no heading makes #{fragment} in {target.relative_to(REPO)}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= FRONT_PAGE_LINES, f"README.md has {len(lines)} lines: move detail to docs/"
    linked = {href.partition("#")[0] for href in parsed(REPO / "README.md")[1]}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in linked]
    assert not missing, f"docs/ pages the README does not link: {missing}"


def layout_table() -> dict[str, set[str]]:
    """docs/layout.md's tables of files: each package's files, as its rows name them in code spans (a row
    with no package continues the one above)."""
    tokens = MarkdownIt("commonmark").enable("table").parse((REPO / "docs" / "layout.md").read_text())
    files: dict[str, set[str]] = {}
    package, cells = None, []
    for token in tokens:
        if token.type == "tr_open":
            cells = []
        elif token.type == "inline" and token.level > 0:  # a cell: the code spans in it
            cells.append([c.content for c in token.children or [] if c.type == "code_inline"])
        elif token.type == "tr_close" and cells[1:] and cells[1]:  # a body row naming files
            package = cells[0][0] if cells[0] else package
            files.setdefault(package, set()).update(name for name in cells[1] if name.endswith(".py"))
    return files


def test_the_layout_page_names_every_module_and_its_job():
    """A newcomer finds each file's one job on the layout page: every product module has a row."""
    table = layout_table()
    packages = ("lmforge", "pipeline", "infra", "flows", "benchmarks")
    modules = sorted(
        p for package in packages for p in (REPO / package).rglob("*.py") if p.name != "__init__.py"
    )
    missing = [
        str(path.relative_to(REPO))
        for path in modules
        if path.name not in table.get(path.parent.relative_to(REPO).as_posix() + "/", set())
    ]
    assert not missing, f"docs/layout.md has no row for {missing}"
