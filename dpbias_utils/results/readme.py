"""The README's results block, generated from the default study's `figures/findings.md`.

Stage 05 writes `findings.md` once and renders both the report's findings (`findings.html`, shown
in `index.html`) and, for the default study, the README block between `START` and `END` from it,
so the README and the report cannot disagree. `python -m dpbias_utils.results.readme` rewrites the block
from the committed `figures/findings.md`; `--check` only compares (exit 1 when they differ).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import paths

START = "<!-- findings:start -->"
END = "<!-- findings:end -->"
NOTE = "<!-- generated from figures/findings.md by stage 05 (or `python -m dpbias_utils.results.readme`); do not edit by hand -->"
README = paths.REPO_ROOT / "README.md"
FINDINGS = paths.FIGURES / "findings.md"


def block(findings_text: str) -> str:
    """The README block for a findings markdown text (markers included)."""
    return f"{START}\n{NOTE}\n\n{findings_text.strip()}\n\n{END}"


def current_block(readme_text: str, source: str = "README.md") -> str:
    """The block now in the README (markers included); a clear error when the markers are missing."""
    start, end = readme_text.find(START), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{source}: the results block markers {START} ... {END} are missing or out of order")
    return readme_text[start:end + len(END)]


def update_readme(readme: Path = README, findings: Path = FINDINGS) -> bool:
    """Rewrite the README's block from ``findings``; True when the README changed."""
    text = Path(readme).read_text(encoding="utf-8")
    new = block(Path(findings).read_text(encoding="utf-8"))
    old = current_block(text, str(readme))
    if old == new:
        return False
    paths.atomic_write_text(Path(readme), text.replace(old, new))
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpbias_utils.results.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when the README block is stale")
    args = ap.parse_args(argv)
    for p in (README, FINDINGS):
        if not p.is_file():
            print(f"{p}: not found", file=sys.stderr)
            return 2
    try:
        if args.check:
            same = current_block(README.read_text(encoding="utf-8")) == block(FINDINGS.read_text(encoding="utf-8"))
            print("README results block is up to date" if same else "README results block differs from figures/findings.md")
            return 0 if same else 1
        changed = update_readme()
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print("README results block rewritten from figures/findings.md" if changed else "README results block already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
