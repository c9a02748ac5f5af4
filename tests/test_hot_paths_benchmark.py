"""benchmarks/hot_paths.py runs and prints one ratio line per pair; an unknown pair is refused. And its
allocator pair's steps (`run_steps`, fresh processes) show what `allocator.tune` claims."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hot_paths.py"


def _module():
    spec = importlib.util.spec_from_file_location("hot_paths", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hot_paths_prints_a_ratio_per_pair(capsys):
    assert _module().main(["--rounds", "1", "--only", "unit_dataset,with_condition"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "ratio=" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["unit_dataset (6,000 units)", "with_condition (30,000 rows)"]
    assert all(float(ln.rsplit("ratio=", 1)[1]) > 0 for ln in lines)


def test_hot_paths_refuses_an_unknown_pair(capsys):
    assert _module().main(["--only", "row_losses,nonsense"]) == 2
    assert "unknown nonsense; allowed: row_losses" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_memory_and_changes_no_bit():
    """allocator.tune: a training step's freed memory is reused (page faults gone), the same weights."""
    run_steps = _module().run_steps
    tuned = run_steps(20)
    # any MALLOC_*_ variable is the user's own glibc setting: tune() leaves glibc's defaults alone
    default = run_steps(20, {"MALLOC_PERTURB_": "0"})
    assert tuned["tuned"] and not default["tuned"]
    assert tuned["digest"] == default["digest"]  # the same weights after 23 Adam steps
    assert default["faults"] > 1000 and tuned["faults"] < default["faults"] / 20, (tuned, default)
