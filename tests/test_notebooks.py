"""Notebooks: committed without outputs, thin, parameterized; nbval executes all five on the tiny profile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpbias_utils import paths

NOTEBOOKS = sorted(paths.NOTEBOOKS.glob("*.ipynb"))
TINY = Path(__file__).parent / "profiles" / "tiny.yaml"


def _code_cells(nb_path):
    return [c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_stage_has_its_notebook():
    assert [p.name for p in NOTEBOOKS] == sorted(paths.STAGE_NOTEBOOKS.values())


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(nb_path):
    for cell in _code_cells(nb_path):
        assert not cell.get("outputs"), f"{nb_path.name} is committed with outputs: strip them"
        assert cell.get("execution_count") is None, f"{nb_path.name} has execution counts: strip them"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_thin_and_parameterized(nb_path):
    cells = _code_cells(nb_path)
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters` (papermill injects after it)"
    for cell in cells:
        src = "".join(cell["source"])
        assert "\ndef " not in "\n" + src and "\nclass " not in "\n" + src, "functions belong in dpbias_utils"
        assert "\nfor " not in "\n" + src, "loops (grids) belong in dpbias_utils / the runner"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_sets_the_user_s_knobs_first_and_names_the_project_kernel(nb_path):
    """The two knobs a reader sets come first; the kernel is the project's (`make setup` registers it)."""
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = [line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines()
             if line and not line.startswith("#")]
    assert names[:2] == ["profile_path", "point"]
    assert nb["metadata"]["kernelspec"]["name"] == paths.KERNEL
    assert f"KERNEL := {paths.KERNEL}" in (paths.REPO_ROOT / "Makefile").read_text()


@pytest.mark.slow
def test_nbval_runs_every_notebook_on_tiny_profile(tmp_path):
    """nbval --nbval-lax: each notebook, run as a researcher would (no injection), on the tiny profile."""
    env = dict(os.environ, DPBIAS_PARAMS=str(TINY), DPBIAS_RUNS=str(tmp_path / "runs"),
               DPBIAS_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           *map(str, NOTEBOOKS)], cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "results.csv").is_file()
