"""Behaviour on a shared machine or cluster: code versions and stale nodes, per-node locks (two runs
at once), progress on the console, Ctrl-C, unwritable or full runs folders, caches that follow
--runs-dir, default file modes. Stand-in notebooks (tests/pipeline/test_run.py) keep these fast."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from test_run import TINY, _notebooks, _write, stand_in_workers  # noqa: F401 - autouse: light node workers

from dpbias_utils import cli, paths
from dpbias_utils.pipeline import graph, provenance
from dpbias_utils.pipeline import node as pipeline_node
from dpbias_utils.pipeline import run as pipeline_run
from dpbias_utils.params import load_profile, parse_profile

REPO = Path(__file__).resolve().parents[2]
ONE_RUN = dict(TINY, grid=[{"epsilon": [None, 3.0], "seed": [0]}], include_base=False)
# Stand-in notebook code that logs each execution to <runs>/executions.log (outside the node folders,
# which a rerun of a stale node clears).
COUNT = ("import pathlib\nwith open(pathlib.Path(out_dir).parents[2] / 'executions.log', 'a') as fh:\n"
         "    fh.write(pathlib.Path(out_dir).name + '\\n')\n")


def _executions(runs: Path) -> dict[str, int]:
    from collections import Counter

    return Counter((runs / "executions.log").read_text().split())


def _cli(*args):
    return [sys.executable, "-m", "dpbias_utils.cli", "run", *map(str, args)]


def _env(tmp_path: Path, **extra) -> dict:
    """The test's environment for a `dpbias` subprocess: no DPBIAS_RUNS or DPBIAS_CACHE (caches then
    go under --runs-dir), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("DPBIAS_RUNS", "DPBIAS_CACHE")}
    return dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


# --------------------------------------------------------------------------- item 4: code version
def test_marker_records_code_and_stale_nodes_are_counted_then_redone(tmp_path, capsys):
    nbs = _notebooks(tmp_path / "nb", {s: COUNT for s in paths.STAGE_NOTEBOOKS})
    profile = parse_profile(ONE_RUN)
    runs = tmp_path / "runs"
    assert cli.run(profile, runs_dir=runs, notebooks=nbs, progress=False).ok
    pdir = runs / "tiny"
    nodes = graph.plan(profile)
    marker = pipeline_node.read_marker(nodes[0].folder(pdir))
    code = marker["code"]
    assert code["commit"] and len(code["commit"]) == 40 and code["dirty"] in (True, False)
    assert code["versions"]["torch"] and code["versions"]["opacus"] and code["versions"]["dpbias-utils"]
    assert code["source_hash"] == provenance.source_hash(nbs / paths.STAGE_NOTEBOOKS["01"])

    # stage 02's notebook changes: its nodes are stale ("code"), 03/04/05 below them ("upstream")
    _notebooks(tmp_path / "nb", {**{s: COUNT for s in paths.STAGE_NOTEBOOKS}, "02": COUNT + "changed = 1\n"})
    again = cli.run(profile, runs_dir=runs, notebooks=nbs, progress=False)
    assert again.ok and not again.completed
    assert {n.stage for n in again.stale_code} == {"02"} and len(again.stale_code) == 2
    assert {n.stage for n in again.stale_upstream} == {"03", "04", "05"} and len(again.stale_upstream) == 5
    assert cli.main(["run", _write(tmp_path, profile), "--runs-dir", str(runs), "--notebooks", str(nbs)]) == 0
    out = capsys.readouterr().out
    assert "2 complete node(s) were computed by other code" in out and "--rerun-stale" in out

    # the report's code changes too: --only 05 redoes the report alone over the kept (stale) upstream
    _notebooks(tmp_path / "nb", {**{s: COUNT for s in paths.STAGE_NOTEBOOKS}, "02": COUNT + "changed = 1\n",
                                 "05": COUNT + "changed = 1\n"})
    report = cli.run(profile, runs_dir=runs, notebooks=nbs, progress=False, rerun_stale=True, only="05")
    assert report.ok and [n.stage for n in report.completed] == ["05"] and report.n_redo == 1
    assert "redoing 1 of these 7" in report.stale_message()

    redo = cli.run(profile, runs_dir=runs, notebooks=nbs, progress=False, rerun_stale=True)
    assert redo.ok and {n.key for n in redo.completed} == {n.key for n in again.stale_code + again.stale_upstream}
    assert _executions(runs) == {n.node_id: {"01": 1, "05": 3}.get(n.stage, 2) for n in nodes}  # 01 not redone
    final = cli.run(profile, runs_dir=runs, notebooks=nbs, progress=False)
    assert not final.stale_code and not final.stale_upstream and len(final.skipped) == len(nodes)


def test_package_change_makes_every_node_stale_and_legacy_markers_count_as_other_code(tmp_path, monkeypatch):
    nbs = _notebooks(tmp_path / "nb")
    profile = parse_profile(ONE_RUN)
    assert cli.run(profile, runs_dir=tmp_path / "runs", notebooks=nbs, progress=False).ok
    nodes, pdir = graph.plan(profile), tmp_path / "runs" / "tiny"
    assert pipeline_run.find_stale(nodes, pdir, nbs) == {}
    monkeypatch.setattr(provenance, "package_hash", lambda: "0" * 16)
    assert set(pipeline_run.find_stale(nodes, pdir, nbs).values()) == {"code"}
    monkeypatch.undo()
    legacy = nodes[-1].folder(pdir) / paths.MARKER  # a marker written before code versions were recorded
    legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items() if k != "code"}))
    assert pipeline_run.find_stale(nodes, pdir, nbs) == {nodes[-1].key: "code"}


# --------------------------------------------------------------------------- item 6: locks
def test_two_runs_at_once_execute_each_node_once(tmp_path):
    """Two `dpbias run` of the tiny profile's graph into one folder at the same time."""
    nbs = _notebooks(tmp_path / "nb", {s: COUNT + "time.sleep(1)\n" for s in paths.STAGE_NOTEBOOKS})
    runs = tmp_path / "runs"
    env = _env(tmp_path)
    cmd = _cli(REPO / "tests/profiles/tiny.yaml", "--runs-dir", runs, "--notebooks", nbs, "--jobs", "2")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    nodes = graph.plan(load_profile(REPO / "tests/profiles/tiny.yaml"))
    assert len(nodes) == 16
    assert _executions(runs) == {n.node_id: 1 for n in nodes}
    summaries = [next(line for line in out.splitlines() if " nodes run, " in line) for out, _ in outs]
    ran = [int(s.split()[0]) for s in summaries]
    assert sum(ran) == 16, summaries  # every node run by exactly one of the two
    for s, (out, _) in zip(summaries, outs):  # each says what the other did: computed there or found complete
        n_run, n_skip, n_else = int(s.split()[0]), int(s.split(", ")[1].split()[0]), int(s.split(", ")[2].split()[0])
        assert n_run + n_skip + n_else == 16, s
        assert out.count(": computed by another process [") == n_else


def test_lock_is_released_when_its_process_dies(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    code = (f"import os, fcntl, sys; sys.path.insert(0, {str(REPO)!r}); from dpbias_utils.pipeline import node; "
            f"fd = node._take_lock({str(folder)!r}, fcntl.LOCK_EX); print('locked', flush=True); "
            "import time; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    holder = pipeline_node.lock_holder(folder)
    assert holder["pid"] == proc.pid and holder["host"]
    proc.kill()
    proc.wait()
    assert pipeline_node.lock_holder(folder) is None  # the OS released it: no stale lock after a kill


# --------------------------------------------------------------------------- item 5: progress
PROGRESS_NB = """
from dpbias_utils.progress import tqdm
import pathlib, time
bar = tqdm(total=10, desc='train demo', unit='step')
bar.update(3)
bar.refresh()
deadline = time.time() + 300
while not pathlib.Path(out_dir, '..', 'go').exists() and time.time() < deadline:
    time.sleep(0.2)
bar.update(7)
bar.close()
"""


@pytest.mark.timeout(600)
def test_console_shows_progress_of_running_node_and_notebook_gets_one_line(tmp_path):
    nbs = _notebooks(tmp_path / "nb", {"02": PROGRESS_NB})
    profile = parse_profile(dict(ONE_RUN, grid=[{"epsilon": [3.0], "seed": [0]}]))
    runs = tmp_path / "runs"
    proc = subprocess.Popen(_cli(_write(tmp_path, profile), "--runs-dir", runs, "--notebooks", nbs),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))
    n02 = next(n for n in graph.plan(profile) if n.stage == "02")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(graph.label(n02)) and "train demo 3/10 step" in line:
            (n02.folder(runs / "tiny").parent / "go").touch()
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + rest
    assert any("train demo 3/10 step" in line for line in seen)
    nb = nbformat.read(n02.folder(runs / "tiny") / "notebook.ipynb", as_version=4)
    streams = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "stream"]
    assert len(streams) == 1 and streams[0]["name"] == "stderr", streams  # no bar updates, one summary line
    assert streams[0]["text"].startswith("train demo: 10/10 step in ")


def test_progress_tqdm_is_plain_tqdm_without_the_runner(tmp_path, monkeypatch, capsys):
    from dpbias_utils import progress

    monkeypatch.delenv(progress.ENV, raising=False)
    with progress.tqdm(total=2, desc="plain", mininterval=0) as bar:
        bar.update(2)
    assert "plain: 100%" in capsys.readouterr().err
    monkeypatch.setenv(progress.ENV, str(tmp_path / "p.json"))
    with progress.tqdm(total=4, desc="outer", unit="step") as outer:
        outer.update(1)
        with progress.tqdm(total=5, desc="inner") as inner:
            inner.update(2)
            inner.refresh()
            state = progress.read(tmp_path / "p.json")
            assert [(b["desc"], b["n"], b["total"]) for b in state["bars"]] == [("outer", 1, 4), ("inner", 2, 5)]
    assert progress.read(tmp_path / "p.json")["last"]["desc"] == "outer"
    assert capsys.readouterr().err.strip().startswith("outer: 1/4 step in ")
    with progress.tqdm(total=3, desc="transient", leave=False) as bar:  # leave=False: no summary line
        bar.update(3)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- item 6: interrupts, folders
SLEEP_NB = "import pathlib, time\npathlib.Path(out_dir, 'started').touch()\ntime.sleep(300)\n"


@pytest.mark.timeout(600)
def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(tmp_path):
    nbs = _notebooks(tmp_path / "nb", {"02": SLEEP_NB})
    profile = parse_profile(dict(ONE_RUN, grid=[{"epsilon": [3.0], "seed": [0]}]))
    spec, runs = _write(tmp_path, profile), tmp_path / "runs"
    # as from a terminal: a test session started in the background (`cmd &` without job control) passes
    # SIGINT down ignored, and Python then keeps ignoring it
    proc = subprocess.Popen(_cli(spec, "--runs-dir", runs, "--notebooks", nbs), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    n02 = next(n for n in graph.plan(profile) if n.stage == "02")
    deadline = time.time() + 300
    while not (n02.folder(runs / "tiny") / "started").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # to the runner alone: it stops its node processes itself
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == cli.INTERRUPTED and "Traceback" not in err, err
    assert pipeline_node.lock_holder(n02.folder(runs / "tiny")) is None and not n02.is_complete(runs / "tiny")
    _notebooks(tmp_path / "nb")
    assert cli.run(profile, runs_dir=runs, notebooks=nbs, progress=False).ok


def _in_tmpfs(tmp_path: Path, options: str, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` with a fresh tmpfs (mount options) at tmp_path/mnt, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -t tmpfs -o {options} none "{mnt}" && exec "$@"'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode()[:200]}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=600)


@pytest.mark.parametrize("options, why", [("ro,size=1m", "read-only"), ("size=64k", "full")])
def test_unwritable_runs_folder_is_one_line_and_exit_2(tmp_path, options, why):
    nbs = _notebooks(tmp_path / "nb")
    spec = _write(tmp_path, parse_profile(ONE_RUN))
    proc = _in_tmpfs(tmp_path, options, _cli(spec, "--runs-dir", tmp_path / "mnt" / "runs", "--notebooks", nbs))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "mnt" / "runs") in lines[0] and why in lines[0], proc.stderr


def test_runs_folder_under_a_file_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "afile").write_text("")
    spec = _write(tmp_path, parse_profile(ONE_RUN))
    proc = subprocess.run(_cli(spec, "--runs-dir", tmp_path / "afile" / "runs"), capture_output=True, text=True,
                          env=_env(tmp_path), timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot be created or written" in proc.stderr and str(tmp_path / "afile" / "runs") in proc.stderr


def test_runs_folder_that_fills_up_during_the_study_stops_it_with_exit_2(tmp_path):
    blob = "pathlib.Path(out_dir, 'blob.bin').write_bytes(bytes(24 * 2**20))\n"
    nbs = _notebooks(tmp_path / "nb", {"02": blob})
    spec = _write(tmp_path, parse_profile(dict(ONE_RUN, grid=[{"epsilon": [3.0], "seed": [0]}])))
    proc = _in_tmpfs(tmp_path, "size=20m", _cli(spec, "--runs-dir", tmp_path / "mnt" / "runs", "--notebooks", nbs))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: runs folder {tmp_path / 'mnt' / 'runs'}")
    assert "full" in proc.stderr and "Traceback" not in proc.stderr


def test_caches_follow_runs_dir_unless_dpbias_cache_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("DPBIAS_CACHE", raising=False)
    monkeypatch.setenv("DPBIAS_RUNS", str(tmp_path / "env-runs"))
    assert paths.cache_dir() == tmp_path / "env-runs" / "_cache"
    assert paths.cache_dir(tmp_path / "cli-runs") == tmp_path / "cli-runs" / "_cache"
    assert paths.profile_dir("p") == tmp_path / "env-runs" / "p"
    monkeypatch.setenv("DPBIAS_CACHE", str(tmp_path / "shared-cache"))
    assert paths.cache_dir(tmp_path / "cli-runs") == tmp_path / "shared-cache"


def test_nodes_get_runs_dir_for_their_caches(tmp_path):
    """With --runs-dir (and no DPBIAS_CACHE), the base-model cache and a node's noise-calibration
    cache are under that folder's _cache/, not under the repository's runs/."""
    calib = ("from dpbias_utils import paths\nfrom dpbias_utils.training import privacy\n"
             "privacy.calibrate_noise(3.0, 1e-5, 0.01, 50, 'rdp')\n"
             "pathlib.Path(out_dir, 'cache.txt').write_text(str(paths.cache_dir()))\n")
    nbs = _notebooks(tmp_path / "nb", {"02": calib})
    runs = tmp_path / "runs"
    spec = _write(tmp_path, parse_profile(dict(ONE_RUN, grid=[{"epsilon": [3.0], "seed": [0]}])))
    proc = subprocess.run(_cli(spec, "--runs-dir", runs, "--notebooks", nbs), capture_output=True, text=True,
                          env=_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    n02 = next(n for n in graph.plan(load_profile(spec)) if n.stage == "02")
    assert (n02.folder(runs / "tiny") / "cache.txt").read_text() == str(runs / "_cache")
    assert (runs / "_cache" / "noise-calibration.jsonl").is_file()
    assert list((runs / "_cache" / "base-models").glob("builtin-*/spec.json"))  # built by the runner before 01


def test_outputs_follow_the_umask_not_0700(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from dpbias_utils import basemodel

    old = os.umask(0o002)
    try:
        staged = paths.staging_dir(tmp_path, ".x.")
        assert staged.stat().st_mode & 0o777 == 0o775
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=2, n_layer=1, n_head=1, n_embd=4, n_positions=8))
        basemodel.save_model_atomic(model, tok, tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o775
    assert all(p.stat().st_mode & 0o777 == 0o664 for p in (tmp_path / "model").iterdir())
