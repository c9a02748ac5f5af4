"""Shared fixtures. Tests never touch the network."""
import os

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
