"""Profile validation: every malformed profile gets one clear message, exit 2, nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpbias_utils import paths
from dpbias_utils.params import ParamsError, load_profile, parse_profile

MINIMAL = {"grid": [{"epsilon": [None, 3.0]}]}


def test_default_profile_is_valid():
    profile = load_profile(paths.DEFAULT_PARAMS)
    assert profile.name == "default"
    pts = profile.points()
    eps = {p["epsilon"] for p in pts}
    assert {None, 3.0, 10.0, 20.0} <= eps
    assert {0.0, 1.0} <= {p["mixing_ratio"] for p in pts if p["epsilon"] is not None}  # CDA 0 vs 1 under DP
    # the main contrasts carry five independent seeds each
    for e in (None, 3.0, 10.0, 20.0):
        assert len({p["seed"] for p in pts if p["epsilon"] == e and p["mixing_ratio"] == 0.0}) >= 5
    assert len({p["seed"] for p in pts if p["epsilon"] == 10.0 and p["mixing_ratio"] == 1.0}) >= 5
    # DP runs follow the profile's written rule; non-DP runs do not
    t = profile.train
    assert t.for_run(True)["logical_batch_size"] == 256 and t.for_run(False)["logical_batch_size"] == 32


def test_grid_is_union_of_products_without_duplicates():
    profile = parse_profile({"grid": [{"epsilon": [None, 3.0], "seed": [0, 1]}, {"epsilon": [3.0], "seed": [1, 2]}]})
    keys = [(p["epsilon"], p["seed"]) for p in profile.points()]
    assert keys == [(None, 0), (None, 1), (3.0, 0), (3.0, 1), (3.0, 2)]


def test_scientific_notation_reads_as_float(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lr: 1e-3\ngrid:\n  - epsilon: [3]\n")
    assert load_profile(f).train.lr == pytest.approx(1e-3)


BAD = [
    ("unknown key", {"grid": [{"epsilon": [3.0]}], "trian": {}}, ["trian", "unknown key"]),
    ("nested unknown key", {"grid": [{"epsilon": [3.0]}], "train": {"learning_rate": 0.1}}, ["train.learning_rate", "unknown key"]),
    ("wrong type", {"grid": [{"epsilon": [3.0]}], "train": {"epochs": "two"}}, ["train.epochs", "'two'"]),
    ("epsilon <= 0", {"grid": [{"epsilon": [0.0]}]}, ["grid[0].epsilon[0]", "0.0", "> 0"]),
    ("negative epsilon", {"grid": [{"epsilon": [-3.0]}]}, ["grid[0].epsilon[0]", "-3.0", "> 0"]),
    ("delta >= 1", {"grid": [{"epsilon": [3.0]}], "train": {"delta": 1.0}}, ["train.delta", "1.0", "< 1"]),
    ("delta <= 0", {"grid": [{"epsilon": [3.0]}], "train": {"delta": 0.0}}, ["train.delta", "0.0", "> 0"]),
    ("mixing ratio > 1", {"grid": [{"epsilon": [3.0], "mixing_ratio": [1.5]}]}, ["grid[0].mixing_ratio[0]", "1.5", "<= 1"]),
    ("mixing ratio < 0", {"grid": [{"epsilon": [3.0], "mixing_ratio": [-0.1]}]}, ["mixing_ratio[0]", "-0.1", ">= 0"]),
    ("clip norm <= 0", {"grid": [{"epsilon": [3.0]}], "train": {"max_grad_norm": 0.0}}, ["train.max_grad_norm", "> 0"]),
    ("grid clip norm <= 0", {"grid": [{"epsilon": [3.0], "max_grad_norm": [-1.0]}]}, ["max_grad_norm[0]", "-1.0", "> 0"]),
    ("batch <= 0", {"grid": [{"epsilon": [3.0]}], "train": {"logical_batch_size": 0}}, ["train.logical_batch_size", "0", "> 0"]),
    ("empty grid", {"grid": []}, ["grid", "at least one block"]),
    ("empty epsilon list", {"grid": [{"epsilon": []}]}, ["grid[0].epsilon", "must not be empty"]),
    ("missing grid", {"train": {}}, ["grid", "required"]),
    ("bad choice", {"grid": [{"epsilon": [3.0]}], "train": {"accountant": "gdp"}}, ["train.accountant", "'gdp'", "'prv'"]),
    ("missing base model folder", {"grid": [{"epsilon": [3.0]}], "model": {"base": "./no/such/model"}}, ["model.base", "./no/such/model", "a hub id or a local model folder"]),
    ("malformed hub model id", {"grid": [{"epsilon": [3.0]}], "model": {"base": "llama 7b"}}, ["model.base", "llama 7b", "namespace/name"]),
    ("single-segment dataset id", {"grid": [{"epsilon": [3.0]}], "data": {"corpus": "text", "text": {"source": "wikitext"}}}, ["data.text.source", "'namespace/name'", "Salesforce/wikitext"]),
    ("split rule on a hub dataset", {"grid": [{"epsilon": [3.0]}], "data": {"corpus": "text", "text": {"source": "Salesforce/wikitext", "split_fractions": {"validation": 0.1, "test": 0.1}}}}, ["data.text.split_fractions", "hub dataset"]),
    ("missing corpus path", {"grid": [{"epsilon": [3.0]}], "data": {"corpus": "text", "text": {"source": "../nope/wiki.txt"}}}, ["data.text.source", "does not exist"]),
    ("missing BOLD path", {"grid": [{"epsilon": [3.0]}], "evaluation": {"bold_source": "/nope/bold.json"}}, ["evaluation.bold_source", "does not exist"]),
    ("physical > logical batch", {"grid": [{"epsilon": [3.0]}], "train": {"logical_batch_size": 8, "physical_batch_size": 16}}, ["train.physical_batch_size", "16"]),
]


@pytest.mark.parametrize("label,raw,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_profiles_name_file_field_value(tmp_path, label, raw, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as exc:
        load_profile(f)
    msg = str(exc.value)
    assert str(f) in msg
    for piece in expected:
        assert piece in msg, (piece, msg)


def test_malformed_yaml_names_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("grid:\n  - epsilon: [3.0\n train: {}\n")
    with pytest.raises(ParamsError, match=r"broken.yaml: malformed YAML at line \d+"):
        load_profile(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_profile(tmp_path / "none.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ParamsError, match="empty"):
        load_profile(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_profile(tmp_path / "list.yaml")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_exit_2_and_nothing_written(tmp_path, command):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"grid": [{"epsilon": [-1.0]}]}))
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "dpbias_utils.cli", command, str(f)]
    if command == "run":
        args += ["--runs-dir", str(runs)]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "grid[0].epsilon[0]" in proc.stderr and "-1.0" in proc.stderr and str(f) in proc.stderr
    assert proc.stderr.count("error:") == 1
    assert not runs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_cli_validate_ok():
    proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "validate", str(paths.DEFAULT_PARAMS)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "valid profile 'default'" in proc.stdout


def test_every_committed_profile_validates():
    for f in sorted(Path(paths.PARAMS).glob("*.yaml")):
        load_profile(f)


def test_privacy_label_is_the_one_readable_name():
    from dpbias_utils.params import NON_DP, privacy_label

    assert privacy_label(None) == NON_DP == "non-DP"
    assert privacy_label(float("inf")) == privacy_label(float("nan")) == "non-DP"
    assert privacy_label(3) == privacy_label(3.0) == "DP ε=3" and privacy_label(0.5) == "DP ε=0.5"


def test_one_corpus_file_needs_an_explicit_split_rule(tmp_path):
    (tmp_path / "c.csv").write_text("body\nsome text\n")
    raw = {"grid": [{"epsilon": [None]}], "data": {"corpus": "text", "text": {"source": str(tmp_path / "c.csv")}}}
    with pytest.raises(ParamsError, match="data.text.source.*one file would serve as train, validation and test"):
        parse_profile(raw)
    raw["data"]["text"].update(split_fractions={"validation": 0.1}, text_column="body")
    with pytest.raises(ParamsError, match="split_fractions.*both 'validation' and 'test'"):
        parse_profile(raw)
    raw["data"]["text"]["split_fractions"] = {"validation": 0.1, "test": 0.1}
    assert parse_profile(raw).data.text.text_column == "body"
