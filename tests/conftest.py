"""Shared fixtures. Tests never touch the network."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from dpbias_utils import paths


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; tests that need it skip when it is absent (the project runs without it)."""
    if not paths.SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {paths.SHARED_DATA}")
    return paths.SHARED_DATA


TINY_PROFILE = Path(__file__).parent / "profiles" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_study_root(tmp_path_factory):
    """The tiny profile run once per test session through `dpbias run --jobs 2`, offline: a folder with
    runs/tiny (the finished study) and cache/ (its DPBIAS_CACHE: the built-in base). Tests only read
    it; a test that changes a study works on a copy."""
    root = tmp_path_factory.mktemp("tiny-study")
    env = dict(os.environ, DPBIAS_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "run", str(TINY_PROFILE), "--runs-dir",
                           str(root / "runs"), "--jobs", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


@pytest.fixture(scope="session")
def tiny_study(tiny_study_root):
    """runs/tiny of `tiny_study_root`: the finished tiny study (read only)."""
    return tiny_study_root / "runs" / "tiny"
