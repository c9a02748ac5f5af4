"""The documentation's links and file names: every relative link in README.md, CHANGELOG.md and docs/
resolves (file and, for `#anchor`, heading), and every repository path named in backticks exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpbias_utils import paths

ROOT = paths.REPO_ROOT
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Pages other branches add; their links are left out of the check until those branches are merged.
# Empty this set once docs/extending.md, docs/gpu.md, docs/audit.md, docs/secret-mode.md and
# docs/performance.md exist.
NOT_YET_MERGED: set[str] = set()  # pages another branch adds (empty: every page is here)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
# A backticked name is a repository path when it starts with one of these (runs/ is generated).
TOP = ("notebooks/", "dpbias_utils/", "params/", "figures/", "docs/", "tests/", "benchmarks/", ".ci/")
TOP_FILES = {"README.md", "CHANGELOG.md", "CITATION.cff", "LICENSE", "Makefile", "pyproject.toml",
             "environment.yml", "constraints.txt"}


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.+)$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def named_paths(page: Path) -> list[str]:
    out = []
    for name in CODE.findall(page.read_text(encoding="utf-8")):
        name = name.split("::")[0].rstrip(".,:;")
        if any(c in name for c in "*<>{}$"):
            continue  # a pattern or a placeholder, not one file
        if name.startswith(TOP) or name in TOP_FILES:
            out.append(name)
    return out


def _rel(p: Path) -> str:
    return p.resolve().relative_to(ROOT).as_posix() if p.resolve().is_relative_to(ROOT) else str(p)


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if _rel(dest) in NOT_YET_MERGED:
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    return bad


@pytest.mark.parametrize("page", DOCS, ids=lambda p: _rel(p))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", DOCS, ids=lambda p: _rel(p))
def test_every_named_repository_path_exists(page):
    missing = [n for n in named_paths(page) if n.rstrip("/") not in NOT_YET_MERGED and not (ROOT / n).exists()]
    assert missing == []


def test_the_checks_catch_a_broken_link_a_missing_anchor_and_a_missing_path(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](nowhere.md) [anchor](#no-such) [web](https://x.org)\n"
                    "`dpbias_utils/no_such_module.py` `runs/default/index.html` `Makefile`\n")
    assert broken_links(page) == ["nowhere.md: no such file", "#no-such: no heading with anchor #no-such"]
    assert named_paths(page) == ["dpbias_utils/no_such_module.py", "Makefile"]


def test_readme_is_an_entry_point():
    """The README stays short, its first screen holds the question, the answer and a figure."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = re.sub(r"<!-- (\w[\w-]*):start -->.*?<!-- \1:end -->", "", text, flags=re.S)  # generated blocks
    assert len(body.splitlines()) <= 200
    first = body[:body.index("## Caveats")]
    assert "arxiv.org/abs/2402.04489" in first and "![" in first and "## The answer" in first
