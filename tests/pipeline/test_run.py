"""Running the stage graph: completion markers, resume after a kill, failures, --only, index."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from dpbias_utils import cli, paths
from dpbias_utils.pipeline import graph, worker
from dpbias_utils.pipeline.node import lock_holder as node_lock_holder
from dpbias_utils.params import parse_profile

# The tiny profile's data and model sections: its built-in base builds in about a second.
_TINY_YAML = yaml.safe_load((Path(__file__).parents[1] / "profiles" / "tiny.yaml").read_text())
TINY = {"name": "tiny", "data": _TINY_YAML["data"], "model": _TINY_YAML["model"],
        "grid": [{"epsilon": [None, 3.0], "mixing_ratio": [0.0, 1.0], "seed": [0]}]}


# What a node worker needs to run a stand-in notebook and render its report (`pipeline.node`,
# `pipeline.inprocess`). The stand-ins import none of the stages' modules (torch, transformers, ...),
# which the worker would otherwise import first: ~10 s of CPU per worker, most of each run here.
STAND_IN_PRELOAD = "papermill,nbconvert,IPython"


@pytest.fixture(autouse=True)
def stand_in_workers(monkeypatch):
    """The runner's workers (in-process runs and `dpbias run` subprocesses alike, which inherit the
    environment) import only `STAND_IN_PRELOAD` (`pipeline.worker.PRELOAD_ENV`)."""
    monkeypatch.setenv(worker.PRELOAD_ENV, STAND_IN_PRELOAD)


def _notebooks(folder: Path, body: dict[str, str] | None = None) -> Path:
    """Stand-in stage notebooks: record the injected point; `body` overrides a stage's code."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage, name in paths.STAGE_NOTEBOOKS.items():
        nb = new_notebook()
        params = new_code_cell("out_dir = None\npoint = None\nupstream = None\nrun_id = None")
        params.metadata["tags"] = ["parameters"]
        code = (body or {}).get(stage, "")
        nb.cells = [params, new_code_cell(
            "import json, pathlib, time\n" + code +
            f"\npathlib.Path(out_dir, 'out.json').write_text(json.dumps({{'point': point, 'upstream': upstream, 'run_id': run_id, 't': time.time()}}))")]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / name)
    return folder


def test_run_skips_complete_nodes_and_writes_reports(tmp_path):
    nbs = _notebooks(tmp_path / "nb")
    profile = parse_profile(dict(TINY, grid=[{"epsilon": [3.0], "seed": [0]}], include_base=False))
    res = cli.run(profile, jobs=2, runs_dir=tmp_path / "runs", notebooks=nbs, progress=False)
    assert res.ok and len(res.completed) == 5
    pdir = tmp_path / "runs" / "tiny"
    for n in graph.plan(profile):
        folder = n.folder(pdir)
        assert (folder / paths.MARKER).is_file()
        assert (folder / "notebook.ipynb").is_file() and (folder / "report.html").is_file()
        assert "import json" not in (folder / "report.html").read_text()  # rendered without code input
    n02 = next(n for n in graph.plan(profile) if n.stage == "02")
    rec = json.loads((n02.folder(pdir) / "out.json").read_text())
    assert rec["point"]["epsilon"] == 3.0 and rec["upstream"]["01"][0].endswith(n02.upstream["01"][0])
    index = (pdir / "index.html").read_text()
    assert all(n.node_id in index for n in graph.plan(profile))
    again = cli.run(profile, jobs=2, runs_dir=tmp_path / "runs", notebooks=nbs, progress=False)
    assert not again.completed and len(again.skipped) == 5
    # the workers imported what the stand-ins need, not the stages' modules (`stand_in_workers`)
    assert "imported 3 modules in " in (pdir / paths.WORKER_LOG).read_text()


def test_failure_keeps_notebook_and_runs_independent_nodes(tmp_path):
    nbs = _notebooks(tmp_path / "nb", {"02": "if point['epsilon'] == 3.0: raise RuntimeError('boom')"})
    profile = parse_profile(dict(TINY, grid=[{"epsilon": [None, 3.0], "seed": [0]}], include_base=False))
    proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "run", "--runs-dir", str(tmp_path / "runs"),
                           "--notebooks", str(nbs), "--jobs", "2", _write(tmp_path, profile)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "FAILED 02/eps3" in proc.stderr and "BLOCKED 03/eps3" in proc.stderr and "BLOCKED 05/" in proc.stderr
    pdir = tmp_path / "runs" / "tiny"
    failed = next(n for n in graph.plan(profile) if n.stage == "02" and n.point["epsilon"] == 3.0)
    nb = nbformat.read(failed.folder(pdir) / "notebook.ipynb", as_version=4)
    assert "boom" in json.dumps(nb.cells[-1].outputs)
    assert not (failed.folder(pdir) / paths.MARKER).exists()
    nondp = [n for n in graph.plan(profile) if n.point.get("epsilon") is None and n.stage in ("02", "03", "04")]
    assert all(n.is_complete(pdir) for n in nondp)  # everything not depending on the failure finished


def _write(tmp_path: Path, profile) -> str:
    f = tmp_path / "tiny.yaml"
    raw = profile.model_dump(mode="json", exclude={"execution"})
    f.write_text(yaml.safe_dump(raw))
    return str(f)


def test_only_stage_requires_upstream(tmp_path):
    nbs = _notebooks(tmp_path / "nb")
    profile = parse_profile(dict(TINY, grid=[{"epsilon": [3.0], "seed": [0]}], include_base=False))
    res = cli.run(profile, only="02", runs_dir=tmp_path / "runs", notebooks=nbs, progress=False)
    assert not res.ok and len(res.blocked) == 1 and not res.completed
    res = cli.run(profile, only="01", runs_dir=tmp_path / "runs", notebooks=nbs, progress=False)
    assert res.ok and [n.stage for n in res.completed] == ["01"]
    res = cli.run(profile, only="02", runs_dir=tmp_path / "runs", notebooks=nbs, progress=False)
    assert res.ok and [n.stage for n in res.completed] == ["02"]


def test_killed_run_resumes_without_redoing_finished_nodes(tmp_path):
    nbs = _notebooks(tmp_path / "nb", {"02": "time.sleep(60 if point['epsilon'] == 3.0 else 0)"})
    profile = parse_profile(dict(TINY, grid=[{"epsilon": [None, 3.0], "seed": [0]}], include_base=False))
    spec = _write(tmp_path, profile)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "dpbias_utils.cli", "run", spec, "--runs-dir", str(runs), "--notebooks", str(nbs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pdir = runs / "tiny"
    slow = next(n for n in graph.plan(profile) if n.stage == "02" and n.point["epsilon"] == 3.0)
    deadline = time.time() + 120
    while time.time() < deadline and not (slow.folder(pdir) / "notebook.ipynb").exists():
        time.sleep(0.5)
    time.sleep(2)
    holder = node_lock_holder(slow.folder(pdir))
    assert holder and holder["pid"] != proc.pid  # the slow node runs, in a process of its own
    # the runner and its node processes die mid-study: the runner's process group, and the group of the
    # node's worker (`pipeline.run._Worker`: a session of its own, which the runner's group does not reach)
    for group in {proc.pid, os.getpgid(holder["pid"])}:
        os.killpg(group, signal.SIGKILL)
    proc.wait()
    while time.time() < deadline and node_lock_holder(slow.folder(pdir)) is not None:
        time.sleep(0.1)  # the OS releases the dead node's lock
    finished = {n.node_id: (n.folder(pdir) / "out.json").read_text() for n in graph.plan(profile) if n.is_complete(pdir)}
    assert finished and not slow.is_complete(pdir)
    body = {"02": ""}  # the resumed run is fast; finished nodes must not be executed again
    nbs2 = _notebooks(tmp_path / "nb", body)
    res = cli.run(profile, runs_dir=runs, notebooks=nbs2, progress=False)
    assert res.ok
    assert {n.node_id for n in res.skipped} == set(finished)
    for node_id, before in finished.items():
        node = next(n for n in graph.plan(profile) if n.node_id == node_id)
        assert (node.folder(pdir) / "out.json").read_text() == before
    assert all(n.is_complete(pdir) for n in graph.plan(profile))
