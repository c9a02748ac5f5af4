"""Which code computed a node: recorded in every `_COMPLETE.json` and shown in the report.

"The same code" means the same **source hash**: SHA-256 over the package's Python files
(`dpbias_utils/**/*.py`, path and bytes) and over the code and markdown cell sources of the stage
notebook the node executed (outputs and metadata excluded, so a notebook opened and saved in
JupyterLab keeps its hash). It is computed from the files on disk, so it is exact whether the
change is committed or not; the git commit and a dirty flag (uncommitted changes to the package,
the notebooks or pyproject.toml) are recorded beside it for people, together with the versions
of the libraries that compute the numbers. A different commit that leaves the package and the
notebook untouched (documentation, tests, profiles: profile changes already change node ids) is
the same code; different library versions are recorded but do not make a node stale.
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .. import paths

PACKAGE = Path(__file__).resolve().parents[1]  # dpbias_utils
LIBRARIES = ("torch", "transformers", "opacus", "datasets", "dpbias-utils")
_GIT_PATHS = ("dpbias_utils", "notebooks", "pyproject.toml")


def _package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=1)
def package_hash() -> str:
    """SHA-256 (16 hex digits) of every Python file of the package: relative path and content."""
    h = hashlib.sha256()
    for f in _package_files():
        h.update(str(f.relative_to(PACKAGE)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def notebook_hash(notebook: Path) -> str:
    """SHA-256 (16 hex digits) of a notebook's cell types and sources (not outputs or metadata)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    cells = [[c.get("cell_type"), "".join(c.get("source", ""))] for c in nb.get("cells", [])
             if c.get("cell_type") in ("code", "markdown")]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()[:16]


def source_hash(notebook: Path) -> str:
    """The hash that decides staleness: the package's and the executed notebook's."""
    return hashlib.sha256(f"{package_hash()}:{notebook_hash(notebook)}".encode()).hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(paths.REPO_ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """{"commit": full hash or None (not a git checkout), "dirty": uncommitted changes to the code}."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *_GIT_PATHS)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


@functools.lru_cache(maxsize=1)
def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version(notebook: Path | None = None) -> dict:
    """The record written into `_COMPLETE.json` under "code" (with the notebook's hashes when given)."""
    record = {**git_state(), "package_hash": package_hash()}
    if notebook is not None:
        record.update(notebook_hash=notebook_hash(notebook), source_hash=source_hash(notebook))
    record["versions"] = library_versions()
    return record


def describe(code: dict | None) -> str:
    """One line for people: `commit 1a2b3c4d5e (uncommitted changes), package 0f1e..., torch 2.13.0, ...`
    (the package hash, not the per-stage source hash, so one version reads the same for every stage)."""
    if not code:
        return "unknown code (computed before code versions were recorded)"
    commit = code.get("commit")
    parts = [f"commit {commit[:10]}" + (" (uncommitted changes)" if code.get("dirty") else "") if commit
             else "not a git checkout"]
    if code.get("package_hash"):
        parts.append(f"package {code['package_hash']}")
    versions = code.get("versions") or {}
    parts += [f"{k} {v}" for k, v in versions.items() if v]
    return ", ".join(parts)
