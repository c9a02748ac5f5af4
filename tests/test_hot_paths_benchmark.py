"""benchmarks/hot_paths.py runs and prints one ratio line per pair; an unknown pair is refused."""
import importlib.util
from pathlib import Path

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
