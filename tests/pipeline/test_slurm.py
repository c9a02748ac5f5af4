"""Slurm execution (dpbias_utils.pipeline.slurm) against a real single-node Slurm cluster on this machine.

The tests never install anything: CI (`.ci/run`) starts the cluster with `tests/slurm/setup.sh` before
`make test`; where no cluster answers (`sinfo` missing or no usable node) they skip saying how to start one.
The main test runs a shrunk tiny profile through `--executor slurm` and through local execution
into separate run folders, at the same time, and requires identical results tables (the runs are
CPU-deterministic: same seeds, one BLAS thread in both, same notebooks).
"""
from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpbias_utils import cli, paths
from dpbias_utils.pipeline import graph
from dpbias_utils.pipeline import node as pipeline_node
from dpbias_utils.params import ParamsError, parse_profile



def _tiny_slurm_profile(name: str) -> dict:
    raw = yaml.safe_load((paths.REPO_ROOT / "tests" / "profiles" / "tiny.yaml").read_text())
    raw["name"] = name
    raw["include_base"] = False
    raw["grid"] = [{"epsilon": [8.0], "mixing_ratio": [0.5], "seed": [0]}]  # one DP run: privacy.csv has a row
    raw["evaluation"]["metrics"] = ["toxicity", "sentiment", "perplexity", "stereotype"]
    raw["execution"] = {
        "slurm_poll_s": 1.0,
        "resources": {s: {"gpus": 0, "cpus": 1, "mem_gb": 2, "time_min": 15} for s in ("01", "02", "03", "04", "05")},
    }
    return raw


# --------------------------------------------------------------------------- no cluster needed
def test_stage_parameters_map_resources():
    from dpbias_utils.pipeline import slurm

    raw = _tiny_slurm_profile("p")
    raw["execution"].update(slurm_partition="gpu", slurm_array_parallelism=3,
                            slurm_additional_parameters={"account": "proj", "qos": "normal"},
                            slurm_setup=["module load cuda"])
    raw["execution"]["resources"]["02"] = {"gpus": 2, "cpus": 8, "mem_gb": 64, "time_min": 720}
    raw.setdefault("train", {})["device"] = "cuda"  # a profile that requests GPUs trains on them
    profile = parse_profile(raw)
    p02 = slurm.stage_parameters(profile, "02", 10)
    assert p02["gpus_per_node"] == 2 and p02["cpus_per_task"] == 8 and p02["mem"] == "64GB" and p02["time"] == 720
    assert p02["partition"] == "gpu" and p02["array_parallelism"] == 3
    assert p02["additional_parameters"] == {"account": "proj", "qos": "normal"}
    assert p02["setup"] == [slurm.JOB_OFFLINE, "module load cuda"]  # jobs run offline after `dpbias prefetch`
    p01 = slurm.stage_parameters(profile, "01", 4)
    assert "gpus_per_node" not in p01  # no --gpus-per-node=0: clusters without GRES reject it
    # a stage without resources gets StageResources' defaults
    del raw["execution"]["resources"]["05"]
    p05 = slurm.stage_parameters(parse_profile(raw), "05", 1)
    assert (p05["cpus_per_task"], p05["mem"], p05["time"]) == (2, "8GB", 60)


def test_partition_and_gpu_request_style_per_stage():
    from dpbias_utils.pipeline import slurm

    raw = _tiny_slurm_profile("p")
    raw.setdefault("train", {})["device"] = "cuda"
    raw["execution"].update(slurm_partition="cpu", slurm_gpu_request="gres")
    raw["execution"]["resources"]["02"] = {"gpus": 1, "partition": "gpu-h100"}
    profile = parse_profile(raw)
    p02, p01 = slurm.stage_parameters(profile, "02", 1), slurm.stage_parameters(profile, "01", 1)
    assert p02["gres"] == "gpu:1" and "gpus_per_node" not in p02 and p02["partition"] == "gpu-h100"
    assert p01["partition"] == "cpu" and "gres" not in p01
    with pytest.raises(ParamsError, match="train.device.*allowed: 'cuda'"):
        raw["train"]["device"] = "auto"  # `auto` would fall back to the CPU without a word
        parse_profile(raw)


def test_a_rejected_submission_fails_its_nodes_not_the_driver(tmp_path, monkeypatch):
    """sbatch refusing a stage (unknown partition, GRES syntax, limits) fails that stage's nodes and
    blocks their downstream; the driver returns its outcome instead of raising."""
    from dpbias_utils.pipeline import slurm
    from dpbias_utils.pipeline.graph import plan

    class Refusing:
        def map_array(self, fn, specs):
            raise RuntimeError("sbatch: error: invalid partition specified: gpu-h100")

    profile = parse_profile(_tiny_slurm_profile("rejected"))
    monkeypatch.setattr(slurm, "slurm_available", lambda: True)
    monkeypatch.setattr(slurm, "executor_for_stage", lambda *a, **k: Refusing())
    nodes = plan(profile)
    out = slurm.run(profile, nodes, nodes, tmp_path / "rejected", paths.NOTEBOOKS, progress=False)
    first = [n for n in nodes if n.stage == "01"]
    assert {n.key for n in out.failed} == {n.key for n in first}
    assert len(out.blocked) == len(nodes) - len(first)
    assert all("invalid partition" in m for m in out.messages.values())


def test_node_job_is_requeued_when_preempted():
    submitit = pytest.importorskip("submitit")
    from dpbias_utils.pipeline import slurm

    job = slurm.NodeJob()
    assert isinstance(job, submitit.helpers.Checkpointable)
    delayed = job.checkpoint("/x/node.json")  # what submitit calls on pre-emption / time-out
    assert delayed.function is job and delayed.args == ("/x/node.json",)


def test_driver_prints_progress_of_running_jobs_from_their_progress_files(tmp_path, monkeypatch):
    import json
    import time

    from dpbias_utils.pipeline import slurm

    monkeypatch.setattr(pipeline_node, "PROGRESS_EVERY_S", 0.0)
    nodes = [n for n in graph.plan(parse_profile(_tiny_slurm_profile("p"))) if n.stage in ("01", "02")]
    folder = nodes[1].folder(tmp_path)
    folder.mkdir(parents=True)
    bar = {"desc": "train eps=8", "n": 3, "total": 10, "unit": "step", "rate": 1.5}
    (folder / paths.PROGRESS).write_text(json.dumps({"bars": [bar], "updated": time.time()}))
    lines = []
    show = slurm._progress_printer(nodes, tmp_path, type("Bar", (), {"write": staticmethod(lines.append)}), True)
    show([0, 1])  # the 01 job has not written progress yet: no line for it
    assert lines == [f"{graph.label(nodes[1])}: train eps=8 3/10 step, 1.5 step/s"]


# --------------------------------------------------------------------------- the cluster
SKIP_HINT = ("`make test` installs nothing; start a single-node cluster first with `sudo bash tests/slurm/setup.sh` "
             "(CI's .ci/run does), see docs/running.md")


def slurm_state() -> str | None:
    """None when a Slurm cluster with an idle or mixed node answers here; else why not."""
    for tool in ("sbatch", "sinfo", "squeue"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 20 s"
    states = set(out.stdout.split())
    if out.returncode != 0 or not states & {"idle", "mixed", "allocated"}:
        return f"`sinfo` shows no usable node (exit {out.returncode}: {(out.stdout + out.stderr).strip()[:200]!r})"
    return None


def require_slurm() -> None:
    why = slurm_state()
    if why is not None:
        pytest.skip(f"no Slurm cluster: {why}; {SKIP_HINT}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running Slurm cluster, never installed by the tests themselves."""
    require_slurm()
    return True


def _tables(profile_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("results.csv", "privacy.csv"):
        df = pd.read_csv(profile_dir / name)
        df = df.drop(columns=[c for c in df.columns if c in ("seconds", "wall_seconds")])
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_matches_local_and_is_idempotent(slurm_cluster, tmp_path, monkeypatch):
    # One BLAS thread in both executions (and in the jobs, which inherit the environment), a cache
    # shared by both so they fine-tune the same built-in base.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("DPBIAS_CACHE", str(tmp_path / "cache"))
    raw = _tiny_slurm_profile("tiny-slurm")
    profile = parse_profile(raw)
    slurm_runs, local_runs = tmp_path / "slurm-runs", tmp_path / "local-runs"

    box = {}

    def on_slurm():
        try:
            box["slurm"] = cli.run(profile, runs_dir=slurm_runs, progress=False, executor="slurm")
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = err

    # The base model is built once (stage 01 of the local run) before both runs use it.
    from dpbias_utils import basemodel  # noqa: F401 - fail here, not in a thread, if imports are broken

    thread = threading.Thread(target=on_slurm)
    thread.start()
    local = cli.run(profile, runs_dir=local_runs, progress=False, executor="local")
    thread.join(timeout=900)
    assert not thread.is_alive(), "the Slurm run did not finish in 15 min"
    if "error" in box:
        raise box["error"]
    via_slurm = box["slurm"]

    slurm_dir, local_dir = slurm_runs / profile.name, local_runs / profile.name
    assert local.ok, f"local run failed: {[n.node_id for n in local.failed + local.blocked]}"
    assert via_slurm.ok, (f"slurm run failed: {[n.node_id for n in via_slurm.failed + via_slurm.blocked]}; "
                          f"{via_slurm.slurm_messages}")
    nodes = graph.plan(profile)
    assert len(via_slurm.completed) == len(nodes)
    for n in nodes:  # same node folders and markers as local execution
        assert (n.folder(slurm_dir) / paths.MARKER).is_file()
        assert (n.folder(slurm_dir) / "notebook.ipynb").is_file()
    assert (slurm_dir / "index.html").is_file()
    assert any((slurm_dir / "_slurm" / "02").glob("*_log.out")), "submitit logs are kept under the run dir"

    a, b = _tables(slurm_dir), _tables(local_dir)
    for name in a:
        assert len(a[name]) > 0, name
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
    # training itself is bit-identical, not only the summary tables
    n02 = next(n for n in nodes if n.stage == "02")
    assert (n02.folder(slurm_dir) / "steps.csv").read_text() == (n02.folder(local_dir) / "steps.csv").read_text()

    # Re-submission submits nothing: every node is complete.
    before = sorted(p.name for p in (slurm_dir / "_slurm").rglob("*_submission.sh"))
    again = cli.run(profile, runs_dir=slurm_runs, progress=False, executor="slurm")
    assert again.ok and not again.completed and len(again.skipped) == len(nodes)
    assert sorted(p.name for p in (slurm_dir / "_slurm").rglob("*_submission.sh")) == before

    # An incomplete node (marker removed, as after a pre-empted job) is the only one resubmitted.
    n05 = next(n for n in nodes if n.stage == "05")
    (n05.folder(slurm_dir) / paths.MARKER).unlink()
    third = cli.run(profile, runs_dir=slurm_runs, progress=False, executor="slurm")
    assert third.ok and [n.key for n in third.completed] == [n05.key]
    assert _tables(slurm_dir)["results.csv"].equals(a["results.csv"])


def test_without_slurm_the_tests_skip_with_the_way_to_start_it(monkeypatch):
    """`make test` installs nothing: no sbatch here means a skip that names the set-up script."""
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert slurm_state() == "`sbatch` not found"
    with pytest.raises(pytest.skip.Exception, match="tests/slurm/setup.sh"):
        require_slurm()
