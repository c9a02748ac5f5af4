"""Every path the project uses, in one place."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
PARAMS = REPO_ROOT / "params"
FIGURES = REPO_ROOT / "figures"
DEFAULT_PARAMS = PARAMS / "default.yaml"
# Generated output; overridable so tests and clusters can put it elsewhere.
RUNS = Path(os.environ.get("DPBIAS_RUNS", REPO_ROOT / "runs"))
# Cache shared by all profiles (the offline base model is built once per spec).
CACHE = Path(os.environ.get("DPBIAS_CACHE", RUNS / "_cache"))
# Real data files for tests (never copied into the project; the project runs without them).
SHARED_DATA = Path(os.environ.get("DPBIAS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

STAGE_NOTEBOOKS = {
    "01": "01_data_cda.ipynb",
    "02": "02_training.ipynb",
    "03": "03_gradient_norms.ipynb",
    "04": "04_bias_evaluation.ipynb",
    "05": "05_figures.ipynb",
}
STAGE_DIRS = {"01": "01_data", "02": "02_train", "03": "03_gradnorms", "04": "04_bias", "05": "05_report"}


def profile_dir(profile: str, runs: Path | None = None) -> Path:
    return Path(runs or RUNS) / profile


def stage_dir(profile: str, stage: str, runs: Path | None = None) -> Path:
    return profile_dir(profile, runs) / STAGE_DIRS[stage]


def shared(*parts: str) -> Path:
    return SHARED_DATA.joinpath(*parts)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
