"""allocator.tune: a training step's freed memory is reused (page faults gone), the weights the same bits.
The steps run in fresh processes (`benchmarks/hot_paths.run_steps`: the allocator pair of the benchmark)."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hot_paths.py"


def _hot_paths():
    spec = importlib.util.spec_from_file_location("hot_paths", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_memory_and_changes_no_bit():
    run_steps = _hot_paths().run_steps
    tuned = run_steps(20)
    # any MALLOC_*_ variable is the user's own glibc setting: tune() leaves glibc's defaults alone
    default = run_steps(20, {"MALLOC_PERTURB_": "0"})
    assert tuned["tuned"] and not default["tuned"]
    assert tuned["digest"] == default["digest"]  # the same weights after 23 Adam steps
    assert default["faults"] > 1000 and tuned["faults"] < default["faults"] / 20, (tuned, default)
