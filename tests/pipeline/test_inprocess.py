"""The in-process papermill engine records what a Jupyter kernel would, and the node worker forks a
fresh child per node (`pipeline.inprocess`, `pipeline.worker`)."""
import json
import os
import subprocess
import sys

import nbformat
import papermill as pm
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from dpbias_utils import paths
from dpbias_utils.pipeline import inprocess, worker


def _notebook(path, *sources):
    nb = new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                             *[new_code_cell(s) for s in sources]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _run_in_child(code: str, tmp_path):
    """Run `code` in a fresh interpreter (the engine's shell is one per process)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT)))
    return proc


def test_outputs_are_those_a_kernel_sends(tmp_path):
    src = _notebook(tmp_path / "in.ipynb",
                    "import sys\nprint('hello', x)\nsys.stderr.write('warned\\n')\nprint('again')",
                    "from IPython.display import Markdown, display\ndisplay(Markdown('**shown**'))\n"
                    "class R:\n    def _repr_markdown_(self):\n        return '| a |\\n|---|'\nR()",
                    "import os\nos.getcwd()", "y = x * 2;")
    code = ("import papermill as pm; from dpbias_utils.pipeline import inprocess; "
            f"pm.execute_notebook({str(src)!r}, 'out.ipynb', parameters={{'x': 5}}, engine_name=inprocess.register(), "
            f"kernel_name='python3', progress_bar=False, cwd={str(tmp_path / 'sub')!r})")
    (tmp_path / "sub").mkdir()
    proc = _run_in_child(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    injected = [c for c in code_cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "x = 5" in injected[0].source
    streams = code_cells[2].outputs
    assert [(o.name, o.text) for o in streams] == [("stdout", "hello 5\n"), ("stderr", "warned\n"), ("stdout", "again\n")]
    shown = code_cells[3].outputs
    assert shown[0].output_type == "display_data" and shown[0].data["text/markdown"] == "**shown**"
    assert shown[1].output_type == "execute_result" and shown[1].data["text/markdown"] == "| a |\n|---|"
    assert shown[1].execution_count == code_cells[3].execution_count
    assert code_cells[4].outputs[0].data["text/plain"] == repr(str(tmp_path / "sub"))  # runs in `cwd`
    assert code_cells[5].outputs == []  # a trailing semicolon shows nothing
    assert [c.execution_count for c in code_cells] == [1, 2, 3, 4, 5, 6]
    assert nb.metadata.papermill["exception"] is None or nb.metadata.papermill["exception"] is False
    assert all(c.metadata.papermill["status"] == "completed" for c in nb.cells)


def test_a_failing_cell_stops_the_notebook_and_papermill_raises(tmp_path):
    src = _notebook(tmp_path / "in.ipynb", "print('before')", "1 / 0", "print('never')")
    code = ("import papermill as pm; from dpbias_utils.pipeline import inprocess\n"
            "try:\n"
            f"    pm.execute_notebook({str(src)!r}, 'out.ipynb', engine_name=inprocess.register(), kernel_name='python3', "
            "progress_bar=False)\n"
            "except pm.PapermillExecutionError as e:\n"
            "    print('RAISED', e.ename, e.evalue)\n")
    proc = _run_in_child(code, tmp_path)
    assert "RAISED ZeroDivisionError division by zero" in proc.stdout, proc.stderr[-3000:]
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source for c in code_cells[1:]] == ["print('before')", "1 / 0", "print('never')"]
    assert code_cells[1].outputs[0].text == "before\n"
    err = code_cells[2].outputs[-1]
    assert err.output_type == "error" and err.ename == "ZeroDivisionError"
    assert any("1 / 0" in line for line in err.traceback)
    assert code_cells[2].metadata.papermill["status"] == "failed" and nb.metadata.papermill["exception"] is True
    assert code_cells[3].outputs == [] and code_cells[3].execution_count is None
    assert any("papermill-error-cell" in c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the node worker forks")
def test_worker_forks_a_fresh_child_per_node_and_answers_its_status(tmp_path, monkeypatch):
    """Two 'nodes' through one worker: each child's numpy global state is fresh (not the worker's), each
    writes its log beside its spec, and a child's failure is its status, not the worker's."""
    import numpy as np

    def fake_execute(spec_path):
        spec = json.loads(spec_path.read_text())
        print("node", spec["name"], flush=True)
        (spec_path.parent / "draw.txt").write_text(repr(np.random.random()))
        return spec["rc"]

    monkeypatch.setattr("dpbias_utils.pipeline.node.execute_node", fake_execute)
    np.random.seed(0)  # the worker's own state: children must not inherit it
    specs = []
    for name, rc in (("a", 0), ("b", 7)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / paths.NODE_SPEC).write_text(json.dumps({"name": name, "rc": rc}))
        specs.append(folder / paths.NODE_SPEC)
    from dpbias_utils.pipeline import provenance

    imported = provenance.package_hash()
    statuses = [worker.run_forked(str(s), imported) for s in specs]
    assert statuses == [0, 7]
    draws = [(tmp_path / n / "draw.txt").read_text() for n in ("a", "b")]
    assert draws[0] != draws[1] and repr(np.random.RandomState(0).random_sample()) not in draws
    assert (tmp_path / "a" / paths.NODE_LOG).read_text().strip() == "node a"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the node worker forks")
def test_the_tiny_study_ran_every_node_in_two_warm_workers(tiny_study):
    """`dpbias run --jobs 2` (the shared tiny study): two workers imported once each, and every node's
    notebook was executed (by the in-process engine: no kernel start before the first cell)."""
    import re

    log = (tiny_study / paths.WORKER_LOG).read_text()
    assert len(re.findall(r"imported \d+ modules in [0-9.]+ s", log)) == 2, log[-2000:]
    notebooks = sorted(tiny_study.glob("0*/*/notebook.ipynb"))
    assert len(notebooks) >= 10
    for nb_path in notebooks:
        nb = nbformat.read(nb_path, as_version=4)
        assert nb.metadata.papermill["exception"] in (None, False), nb_path
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.execution_count == 1 and first.metadata.papermill["status"] == "completed"


def test_worker_preloads_every_stage_module_unless_the_environment_names_others(monkeypatch):
    """`pipeline.worker.PRELOAD_ENV` (set by the runner's tests, whose stand-in notebooks import none of
    the stages' modules) replaces the preload list; unset, a worker imports all of `PRELOAD`."""
    monkeypatch.delenv(worker.PRELOAD_ENV, raising=False)
    assert worker.preload_modules() == worker.PRELOAD and "torch" in worker.PRELOAD
    monkeypatch.setenv(worker.PRELOAD_ENV, "papermill, nbconvert,")
    assert worker.preload_modules() == ("papermill", "nbconvert")
    monkeypatch.setenv(worker.PRELOAD_ENV, "")
    assert worker.preload_modules() == ()


def test_a_worker_that_never_imported_torch_has_no_cuda_to_lose_in_a_fork(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True, raising=False)
    assert worker._cuda_unusable_after_fork()  # torch imported, CUDA initialised before the fork
    monkeypatch.delitem(sys.modules, "torch")
    assert not worker._cuda_unusable_after_fork()  # never imported: nothing initialised, no import in the child
    assert "torch" not in sys.modules


def test_an_unknown_node_engine_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    from dpbias_utils import cli
    from dpbias_utils.pipeline import node

    monkeypatch.setenv(node.ENGINE_ENV, "docker")
    rc = cli.main(["run", str(paths.REPO_ROOT / "tests/profiles/tiny.yaml"), "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "DPBIAS_NODE_ENGINE='docker'" in err and "inprocess, kernel" in err
    assert not any(tmp_path.iterdir())  # nothing was run
