"""Plan and cost (`dpbias run --dry-run`): tokens, steps per run, GPU hours from the throughput table;
and the GPU check's CPU smoke run (its CSV lines feed that table)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dpbias_utils import cli, cost, paths
from dpbias_utils.params import load_profile, parse_profile

DISTIL = paths.PARAMS / "paper-distilgpt2.yaml"
HEADER = "model,mode,device,block_size,physical_batch,precision,tokens_per_s,peak_mem_gb,source,date\n"


def test_dry_run_prints_plan_tokens_steps_gpu_hours(capsys):
    assert cli.main(["run", str(DISTIL), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 02 (02_training.ipynb): 60 nodes" in out
    assert "cost of 60 training runs" in out
    assert "103,227,021 words" in out and "tokens per epoch" in out
    assert "steps/run" in out and "GPU-h" in out
    assert "A100" in out and "H100" in out
    assert "ASSUMPTION" in out or "measured" in out  # every throughput says where it comes from


def test_paper_estimate_numbers():
    p = load_profile(DISTIL)
    est = cost.estimate(p)
    size = est["size"]
    # WikiText-103 train: ~120M GPT-2 tokens, ~1.44 units per non-empty row at block 128
    assert 100e6 < size.tokens < 130e6 and 1.5e6 < size.n_units < 2.0e6
    runs = est["runs"]
    assert len(runs) == 60 and {r["mode"] for r in runs} == {"nondp", "dp"}
    assert all(r["steps"] == round(size.n_units / 1024) for r in runs)
    assert all(r["compute_tokens"] >= r["tokens"] for r in runs)  # padding to the batch's longest row
    for dev in ("A100", "H100"):
        assert est["devices"][dev]["gpu_hours"] > 0
    # the H100 figure is scaled from the A100 row, and says so
    how = est["devices"]["H100"]["throughput"]["dp"][1]
    assert "scaled from distilgpt2 on A100" in how and "fp32" in how


def test_throughput_lookup_exact_scaled_and_missing(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text(HEADER
                   + "distilgpt2,dp,NVIDIA H200,128,32,fp32,40000,20.5,measured on GPU: gpu_check,2026-01-01\n"
                   + "distilgpt2,nondp,NVIDIA H200,128,32,bf16-autocast,400000,5.1,measured on GPU: gpu_check,2026-01-01\n"
                   + "broken,line\n")
    rows = cost.load_throughput(csv)
    assert [r.device for r in rows] == ["H200", "H200"] and rows[0].measured
    shape = ("distilgpt2", 6, 768, 50257)
    tps, how = cost.lookup_throughput(rows, shape, "dp", "H200", 128)
    assert tps == 40000 and how.startswith("measured")
    tps, how = cost.lookup_throughput(rows, shape, "dp", "A100", 128)  # fp32 peak 19.5 / 67
    assert tps == pytest.approx(40000 * 19.5 / 67.0) and "scaled from distilgpt2 on H200" in how
    xl = ("gpt2-xl", 48, 1600, 50257)
    tps_xl, how = cost.lookup_throughput(rows, xl, "dp", "H200", 128)
    ratio = cost.flops_per_token(6, 768, 50257, 128) / cost.flops_per_token(48, 1600, 50257, 128)
    assert tps_xl == pytest.approx(40000 * ratio) and "FLOPs/token" in how
    assert cost.lookup_throughput(rows, shape, "dp-fast", "H200", 128)[0] is None
    assert cost.gpu_key("NVIDIA A100-SXM4-80GB") == "A100" and cost.gpu_key("NVIDIA H100 80GB HBM3") == "H100"


def test_controlled_and_local_corpus_sizes(tmp_path):
    tiny = load_profile(paths.REPO_ROOT / "tests" / "profiles" / "tiny.yaml")
    est = cost.estimate(tiny, gpus=["A100"])
    assert est["size"].n_units == 400  # n_train_sentences: one sentence per unit
    assert all(r["steps"] == round(400 / 32) for r in est["runs"])
    assert "controlled corpus" in cost.describe_cost(tiny)

    text = tmp_path / "corpus"  # one file per split (one file alone would serve every split)
    text.mkdir()
    (text / "train.txt").write_text("\n".join(f"Sentence number {i} is about the weather and she liked it ." for i in range(300)))
    (text / "validation.txt").write_text("held out\n")
    (text / "test.txt").write_text("held out too\n")
    raw = {"name": "local", "data": {"corpus": "text", "text": {"source": str(text)}, "block_size": 32,
                                     "max_train_units": 200},
           "train": {"logical_batch_size": 20, "physical_batch_size": 10}, "grid": [{"epsilon": [None, 3.0]}]}
    size = cost.corpus_size(parse_profile(raw))
    assert size.n_units == 200 and "300 rows counted" in size.how
    assert 0.9 < size.gendered_share <= 1.0  # every row has "she"
    out = cost.describe_cost(parse_profile(raw))
    assert "10 steps/run" in out


def test_unknown_hub_dataset_does_not_break_dry_run():
    raw = {"data": {"corpus": "text", "text": {"source": "someone/corpus", "config": None}}, "grid": [{"epsilon": [None]}]}
    assert "cost estimate unavailable" in cost.describe_cost(parse_profile(raw))


def test_gpu_check_quick_runs_on_cpu(tmp_path):
    out_csv = tmp_path / "throughput.csv"
    out_csv.write_text(HEADER)
    proc = subprocess.run([sys.executable, str(paths.REPO_ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu",
                           "--modes", "nondp,dp", "--steps", "1", "--warmup", "0", "--threads", "1",
                           "--append", str(out_csv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio dp/nondp: time" in proc.stdout
    rows = cost.load_throughput(out_csv)
    assert {r.mode for r in rows} == {"nondp", "dp"} and all(r.device == "cpu" and r.tokens_per_s > 0 for r in rows)
    assert all(r.measured for r in rows)


def test_gpu_check_reports_a_failing_mode_and_goes_on(tmp_path):
    # a mode that raises (here an unknown one) is reported, and the modes after it are still measured
    proc = subprocess.run([sys.executable, str(paths.REPO_ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu",
                           "--modes", "nondp,broken,dp", "--steps", "1", "--warmup", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "broken: FAILED: ValueError" in proc.stdout and "failed mode broken" in proc.stdout
    assert "ratio dp/nondp: time" in proc.stdout  # dp ran after the failure
