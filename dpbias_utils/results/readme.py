"""The generated blocks of README.md and docs/: each is rewritten from one committed markdown file.

A block is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in one document; it is
generated, never edited by hand, and a test checks that it equals its source. The blocks:

* ``findings``, ``mechanism-findings``, ``nonbinary-findings`` (`PUBLISHED`): each published
  profile's findings and the figures published beside them, in ``docs/results/<profile>.md``. Stage 05 writes ``findings.md`` once, renders
  the report's findings (``findings.html``, shown in ``index.html``) from it and, for a published
  profile run into the repository's ``runs/``, copies its figures and findings.md to the profile's
  figures folder and rewrites the block from it; so the docs and the report cannot disagree.
* ``verdicts`` (`VERDICTS`): the README's verdict table, the "Summary of verdicts" of every
  published profile's findings.md, one row per claim (`verdict_table`).
* ``regimes`` (`REGIMES`): the README's headline, right under the question, rewritten from
  ``figures/regimes.md`` (``update_block(REGIMES)``, or ``write_block(REGIMES, text)`` which writes the
  source and the block together).

`python -m dpbias_utils.results.readme` rewrites every block from the committed sources; `--check`
only compares (exit 1 when one differs).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import paths

README = paths.README


def _rel(path: Path) -> str:
    path = Path(path)
    return path.relative_to(paths.REPO_ROOT).as_posix() if path.is_relative_to(paths.REPO_ROOT) else str(path)


@dataclass(frozen=True)
class Block:
    """One generated block: its marker name, the markdown file it is generated from (`findings`) and
    the document that holds it (`doc`). For a published profile the source's folder is where stage 05
    publishes the profile's figures."""
    name: str
    findings: Path
    doc: Path = README
    writer: str = "stage 05"  # what writes the source markdown (named in the block's note)

    @property
    def folder(self) -> Path:
        return self.findings.parent

    @property
    def start(self) -> str:
        return f"<!-- {self.name}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def note(self) -> str:
        return (f"<!-- generated from {_rel(self.findings)} by {self.writer} (or `python -m dpbias_utils.results.readme`); "
                "do not edit by hand -->")

    def render(self, source_text: str) -> str:
        """The block's body for its source text (the findings blocks: the text itself)."""
        return source_text.strip()


@dataclass(frozen=True)
class VerdictBlock(Block):
    """The README's verdict table, built from the "Summary of verdicts" of every published profile."""

    def note(self) -> str:
        srcs = ", ".join(_rel(b.findings) for b in PUBLISHED.values())
        return (f"<!-- generated from the summaries of {srcs} by `python -m dpbias_utils.results.readme` "
                "(stage 05 of a published profile too); do not edit by hand -->")

    def source_text(self) -> str:
        return verdict_table({name: b.findings.read_text(encoding="utf-8") for name, b in PUBLISHED.items()})


@dataclass(frozen=True)
class FindingsBlock(Block):
    """A published profile's findings, followed by every figure stage 05 published beside them (in the
    report's order, each with its caption), so the page shows exactly the figures of the last run."""

    def render(self, source_text: str) -> str:
        import os

        from .figures import FIGURE_CAPTIONS, TOXICITY_SCORES

        figs = [(name, caption) for name, caption in FIGURE_CAPTIONS.items() if (self.folder / f"{name}.png").is_file()]
        if not figs:
            return source_text.strip()
        lines = [source_text.strip(), "", "### Figures"]
        for i, (name, caption) in enumerate(figs, 1):
            src = os.path.relpath(self.folder / f"{name}.png", self.doc.parent)
            text = caption.replace("{score}", TOXICITY_SCORES["profanity"] + " or Detoxify toxicity")
            lines += ["", f"![{name.replace('_', ' ')}]({Path(src).as_posix()})", "", f"*Figure {i}.* {text}"]
        return "\n".join(lines)


# profile name -> its findings block (in docs/results/<profile>.md)
PUBLISHED = {name: FindingsBlock(marker, folder / "findings.md", paths.DOCS / "results" / f"{name}.md")
             for name, marker, folder in (("default", "findings", paths.FIGURES),
                                          ("mechanism", "mechanism-findings", paths.FIGURES / "mechanism"),
                                          ("nonbinary", "nonbinary-findings", paths.FIGURES / "nonbinary"))}
DEFAULT = PUBLISHED["default"]
START, END, FINDINGS = DEFAULT.start, DEFAULT.end, DEFAULT.findings
# The README's headline: when DP amplifies bias and when it attenuates it (the regime map's answer).
REGIMES = Block("regimes", paths.FIGURES / "regimes.md", README, writer="the regime map")
VERDICTS = VerdictBlock("verdicts", paths.FIGURES / "findings.md", README)
BLOCKS = (REGIMES, VERDICTS, *PUBLISHED.values())

_SUMMARY = re.compile(r"^- \*\*(?P<claim>.+?)\*\* \((?P<n>\d+) contrasts?\): (?P<verdicts>.+?)\.?$")


def verdict_table(findings_by_profile: dict[str, str]) -> str:
    """One row per claim of each profile's "Summary of verdicts" (markdown table)."""
    rows = ["| profile | claim | contrasts | verdicts |", "|---|---|---|---|"]
    for profile, text in findings_by_profile.items():
        section = text.split("### Summary of verdicts", 1)[-1].split("\n###", 1)[0]
        for line in section.splitlines():
            m = _SUMMARY.match(line.strip())
            if m:
                rows.append(f"| [{profile}](docs/results/{profile}.md) | {m['claim']} | {m['n']} | {m['verdicts']} |")
    return "\n".join(rows)


def _source_text(which: Block, source: Path | None = None) -> str:
    if source is None and isinstance(which, VerdictBlock):
        return which.source_text()
    return Path(source or which.findings).read_text(encoding="utf-8")


def block(findings_text: str, which: Block = DEFAULT) -> str:
    """The block for a source markdown text (markers included)."""
    return f"{which.start}\n{which.note()}\n\n{which.render(findings_text)}\n\n{which.end}"


def current_block(text: str, source: str = "README.md", which: Block = DEFAULT) -> str:
    """The block now in a document's text (markers included); a clear error when the markers are missing."""
    start, end = text.find(which.start), text.find(which.end)
    if start < 0 or end < start:
        raise ValueError(f"{source}: the generated block markers {which.start} ... {which.end} are missing or out of order")
    return text[start:end + len(which.end)]


def update_block(which: Block = DEFAULT, source: Path | None = None, doc: Path | None = None) -> bool:
    """Rewrite ``which``'s block in its document (or ``doc``) from its source markdown (or ``source``);
    True when the document changed."""
    doc = Path(doc or which.doc)
    text = doc.read_text(encoding="utf-8")
    new = block(_source_text(which, source), which)
    old = current_block(text, _rel(doc), which)
    if old == new:
        return False
    paths.atomic_write_text(doc, text.replace(old, new))
    return True


def write_block(which: Block, text: str) -> bool:
    """Write ``text`` as ``which``'s source markdown (e.g. figures/regimes.md) and rewrite its block
    from it; True when the document changed. The regime map fills the README's headline this way:
    ``write_block(REGIMES, markdown)``."""
    which.findings.parent.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(which.findings, text.strip() + "\n")
    return update_block(which)


def update_readme(readme: Path | None = None, findings: Path | None = None, which: Block = DEFAULT) -> bool:
    """`update_block` with the document first (kept for stage 05 and older callers)."""
    return update_block(which, findings, readme)


def is_current(which: Block, doc: Path | None = None) -> bool:
    """Does the document's block equal its committed source?"""
    doc = Path(doc or which.doc)
    return current_block(doc.read_text(encoding="utf-8"), _rel(doc), which) == block(_source_text(which), which)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpbias_utils.results.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a generated block is stale")
    args = ap.parse_args(argv)
    missing = [p for b in BLOCKS for p in (b.doc, b.findings) if not p.is_file()]
    if missing:
        print(f"{missing[0]}: not found", file=sys.stderr)
        return 2
    status = 0
    try:
        for which in BLOCKS:
            where = f"{_rel(which.doc)} block {which.name}"
            if args.check:
                same = is_current(which)
                print(f"{where} " + ("is up to date" if same else f"differs from {_rel(which.findings)}"))
                status = status or (0 if same else 1)
            else:
                changed = update_block(which)
                print(f"{where} " + (f"rewritten from {_rel(which.findings)}" if changed else "already up to date"))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
