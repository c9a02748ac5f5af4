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

from dpbias_utils import allocator, paths

allocator.tune()  # the tests' own training steps reuse freed memory, as node processes do


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; tests that need it skip when it is absent (the project runs without it)."""
    if not paths.SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {paths.SHARED_DATA}")
    return paths.SHARED_DATA


TINY_PROFILE = Path(__file__).parent / "profiles" / "tiny.yaml"


def shared_session_dir(tmp_path_factory) -> Path:
    """A folder every worker of this test session finds: the session's base temp folder, or under
    pytest-xdist (`make test`: two workers) the folder that holds each worker's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_study_root(tmp_path_factory):
    """The tiny profile run once per test session through `dpbias run --jobs 2`, offline: a folder with
    runs/tiny (the finished study) and cache/ (its DPBIAS_CACHE: the built-in base). Tests only read
    it; a test that changes a study works on a copy. Under pytest-xdist the first worker that needs it
    builds it under a lock and the other reuses it."""
    import fcntl

    root = shared_session_dir(tmp_path_factory) / "tiny-study"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "BUILT").is_file():
            env = dict(os.environ, DPBIAS_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "run", str(TINY_PROFILE), "--runs-dir",
                                   str(root / "runs"), "--jobs", "2"], env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
            (root / "BUILT").touch()
    return root


@pytest.fixture(scope="session")
def tiny_study(tiny_study_root):
    """runs/tiny of `tiny_study_root`: the finished tiny study (read only)."""
    return tiny_study_root / "runs" / "tiny"


# Modules that build a whole study or run many node processes. Under pytest-xdist (`make test`, run
# with --no-loadscope-reorder) they are handed out first, so that the two workers share them out and
# the run does not end with one worker alone on a study while the other has nothing left.
FIRST = ("test_study.py", "test_regime_chain.py", "test_paper_profiles.py", "test_notebooks.py", "test_slurm.py",
         "test_cluster.py")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker; every worker sorts its collection alike
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: module order kept
