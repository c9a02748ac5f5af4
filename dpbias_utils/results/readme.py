"""The README's results blocks, generated from the committed findings of the published profiles.

Stage 05 writes `findings.md` once and renders both the report's findings (`findings.html`, shown
in `index.html`) and, for a published profile run into the repository's `runs/` (`PUBLISHED`: the
default study, the mechanism sweep, the non-binary profile), its README block between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` from it, after copying the figures and
findings.md to the profile's figures folder; so the README and the report cannot disagree.
`python -m dpbias_utils.results.readme` rewrites every block from the committed findings; `--check`
only compares (exit 1 when one differs).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import paths

README = paths.REPO_ROOT / "README.md"


@dataclass(frozen=True)
class Block:
    """One README block: its marker name and the folder stage 05 publishes the profile's figures and
    findings.md to."""
    name: str
    folder: Path

    @property
    def start(self) -> str:
        return f"<!-- {self.name}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    @property
    def findings(self) -> Path:
        return self.folder / "findings.md"

    def note(self) -> str:
        rel = self.findings.relative_to(paths.REPO_ROOT) if self.findings.is_relative_to(paths.REPO_ROOT) else self.findings
        return (f"<!-- generated from {rel.as_posix()} by stage 05 (or `python -m dpbias_utils.results.readme`); "
                "do not edit by hand -->")


# profile name -> its README block
PUBLISHED = {"default": Block("findings", paths.FIGURES),
             "mechanism": Block("mechanism-findings", paths.FIGURES / "mechanism"),
             "nonbinary": Block("nonbinary-findings", paths.FIGURES / "nonbinary")}
DEFAULT = PUBLISHED["default"]
START, END, FINDINGS = DEFAULT.start, DEFAULT.end, DEFAULT.findings


def block(findings_text: str, which: Block = DEFAULT) -> str:
    """The README block for a findings markdown text (markers included)."""
    return f"{which.start}\n{which.note()}\n\n{findings_text.strip()}\n\n{which.end}"


def current_block(readme_text: str, source: str = "README.md", which: Block = DEFAULT) -> str:
    """The block now in the README (markers included); a clear error when the markers are missing."""
    start, end = readme_text.find(which.start), readme_text.find(which.end)
    if start < 0 or end < start:
        raise ValueError(f"{source}: the results block markers {which.start} ... {which.end} are missing or out of order")
    return readme_text[start:end + len(which.end)]


def update_readme(readme: Path | None = None, findings: Path | None = None, which: Block = DEFAULT) -> bool:
    """Rewrite the README's (default: the repository's) ``which`` block from ``findings`` (default: the
    block's committed findings.md); True when the README changed."""
    readme = Path(readme or README)
    text = readme.read_text(encoding="utf-8")
    new = block(Path(findings or which.findings).read_text(encoding="utf-8"), which)
    old = current_block(text, str(readme), which)
    if old == new:
        return False
    paths.atomic_write_text(readme, text.replace(old, new))
    return True


def is_current(which: Block, readme: Path | None = None) -> bool:
    """Does the README's block equal its committed findings.md?"""
    readme = Path(readme or README)
    return current_block(readme.read_text(encoding="utf-8"), str(readme), which) == block(
        which.findings.read_text(encoding="utf-8"), which)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpbias_utils.results.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a README block is stale")
    args = ap.parse_args(argv)
    missing = [p for p in (README, *(b.findings for b in PUBLISHED.values())) if not p.is_file()]
    if missing:
        print(f"{missing[0]}: not found", file=sys.stderr)
        return 2
    status = 0
    try:
        for which in PUBLISHED.values():
            rel = which.findings.relative_to(paths.REPO_ROOT).as_posix()
            if args.check:
                same = is_current(which)
                print(f"README block {which.name} " + ("is up to date" if same else f"differs from {rel}"))
                status = status or (0 if same else 1)
            else:
                changed = update_readme(which=which)
                print(f"README block {which.name} " + (f"rewritten from {rel}" if changed else "already up to date"))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
