"""One node: its spec, its execution with papermill in a process of its own, its locks, its
completion marker, its HTML report and the progress line of it running.

The notebook's cells run in the node's own process (`inprocess`, a papermill engine); with
``DPBIAS_NODE_ENGINE=kernel`` papermill starts a Jupyter kernel for them instead, as a notebook
run by hand does. The local runner forks node processes from warm workers (`worker`); a Slurm job
runs this module as a fresh process.

A node is complete when `_COMPLETE.json` (`paths.MARKER`) exists in its folder; it is written
last, after the executed notebook, its HTML rendering and the stage's outputs. Re-running skips
complete nodes, so an interrupted study resumes (stage 02 also resumes inside a run from its
checkpoints). A node's process is `python -m dpbias_utils.pipeline.node NODE_JSON`.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from .. import paths
from .. import progress as node_progress
from ..params import Profile
from . import provenance
from .graph import Node, label

EXIT_DONE_ELSEWHERE = 3  # execute_node found the node completed by another process: nothing run here
PROGRESS_EVERY_S = 10.0  # a console line per running node this often


def node_parameters(profile: Profile, node: Node, profile_dir: Path) -> dict:
    """What papermill injects: the profile's sections, the grid point, the node's folders."""
    dump = profile.model_dump(mode="json")
    params = {k: dump[k] for k in ("name", "data", "model", "train", "gradnorms", "evaluation")}
    params.update(
        point=node.point,
        run_id=node.run_id,
        out_dir=str(node.folder(profile_dir)),
        upstream={s: [str(Path(profile_dir) / paths.STAGE_DIRS[s] / i) for i in ids] for s, ids in node.upstream.items()},
        profile_dir=str(profile_dir),
    )
    return params


def write_node_spec(profile: Profile, node: Node, profile_dir: Path, notebooks: Path) -> Path:
    folder = node.folder(profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"stage": node.stage, "notebook": str(Path(notebooks) / paths.STAGE_NOTEBOOKS[node.stage]),
            "parameters": node_parameters(profile, node, profile_dir), "rerun": node.rerun}
    path = folder / paths.NODE_SPEC
    paths.atomic_write_text(path, json.dumps(spec, indent=1))
    return path


ENGINE_ENV = "DPBIAS_NODE_ENGINE"  # "inprocess" (default) or "kernel"
ENGINES = ("inprocess", "kernel")


@functools.lru_cache(maxsize=1)
def html_exporter():
    """The report exporter (no code input), built once per process: its templates compile on first use."""
    from nbconvert import HTMLExporter

    return HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)


def render_html(notebook_path: Path, html_path: Path) -> None:
    """HTML report of an executed notebook without code input (what readers open).

    Progress bars and library warnings (stderr) are left out of the report; they stay in the
    executed notebook beside it, and errors are always shown.
    """
    import nbformat

    nb = nbformat.read(notebook_path, as_version=4)
    for cell in nb.cells:
        if cell.get("outputs"):
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    body, _ = html_exporter().from_notebook_node(nb)
    paths.atomic_write_text(html_path, body)


def engine() -> str:
    """The node engine `ENGINE_ENV` names (`ENGINES`); an unknown name is an error before any node runs."""
    name = os.environ.get(ENGINE_ENV, "inprocess")
    if name not in ENGINES:
        raise ValueError(f"environment variable {ENGINE_ENV}={name!r}: allowed values are {', '.join(ENGINES)}")
    return name


# --------------------------------------------------------------------------- locks and markers
def _open_lock(folder: Path) -> int:
    return os.open(Path(folder) / paths.LOCK, os.O_RDWR | os.O_CREAT, 0o666)


def lock_holder(folder: Path) -> Optional[dict]:
    """Who holds the node's lock ({"pid", "host", "started"}), or None when nobody does.

    The lock is `fcntl.flock` on `<node>/.lock`: the OS releases it when its process dies, so a
    killed run leaves no stale lock behind. A node's own execution holds it exclusively; nodes
    that read it (downstream) hold it shared while they run, so it is never rewritten under them.
    """
    if not (Path(folder) / paths.LOCK).is_file():
        return None
    fd = _open_lock(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            return {}
    finally:
        os.close(fd)  # closing releases a lock taken here
    return None


def _take_lock(folder: Path, how: int) -> int:
    fd = _open_lock(folder)
    fcntl.flock(fd, how)
    if how == fcntl.LOCK_EX:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
    return fd


def read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / paths.MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_current(marker: Optional[dict], source: str, upstream_markers: dict[str, Optional[dict]]) -> bool:
    """A marker is current when this source hash wrote it and its upstream nodes have not been
    recomputed since (each upstream marker's `run` is the one it read)."""
    if not marker or (marker.get("code") or {}).get("source_hash") != source:
        return False
    seen = marker.get("upstream_runs") or {}
    return all(m is not None and seen.get(i) == m.get("run") for i, m in upstream_markers.items())


# --------------------------------------------------------------------------- execution
def _execute(spec: dict, folder: Path, notebook: str) -> bool:
    """papermill on the node; renders the report even after a failure (the partial notebook stays)."""
    import papermill as pm

    from . import inprocess

    out_nb = folder / "notebook.ipynb"
    # in process, the kernel name only picks papermill's parameter translator (Python's)
    how = ({"engine_name": inprocess.register(), "kernel_name": paths.KERNEL} if engine() == "inprocess"
           else {"kernel_name": paths.kernel_name()})
    try:
        pm.execute_notebook(notebook, str(out_nb), parameters=spec["parameters"], cwd=str(folder),
                            progress_bar=False, log_output=False, **how)
    except Exception as exc:  # noqa: BLE001 - any failure of the notebook fails the node
        try:
            render_html(out_nb, folder / "report.html")
        except Exception:  # noqa: BLE001
            pass
        print(f"node {spec['stage']}/{folder.name} failed: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr)
        return False
    render_html(out_nb, folder / "report.html")
    return True


def _node_env(folder: Path, runs_root: Path) -> None:
    """Environment of the node's kernel: its caches under the runs root (unless DPBIAS_CACHE is set),
    progress to `<node>/.progress.json` (progress.tqdm), no bars of libraries in the notebook."""
    os.environ.update({node_progress.ENV: str(folder / paths.PROGRESS), "DPBIAS_RUNS": str(runs_root)})
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own switch; progress.tqdm ignores it


def _clear_outputs(folder: Path) -> None:
    """Remove a node's outputs, marker first; keep its spec, lock and log."""
    (folder / paths.MARKER).unlink(missing_ok=True)
    for p in folder.iterdir():
        if p.name in (paths.NODE_SPEC, paths.LOCK, paths.NODE_LOG):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def execute_node(spec_path: Path) -> int:
    """Run one node from its `node.json` (in a fresh process); returns an exit status.

    Holds the node's lock exclusively and its upstream nodes' locks shared while it runs. A node
    already complete when the lock is obtained (another process finished it meanwhile) is not run
    again (EXIT_DONE_ELSEWHERE); with `"rerun": true` in the spec a complete node is run again
    unless its marker is current (then another process already redid it).
    """
    spec = json.loads(Path(spec_path).read_text())
    params = spec["parameters"]
    folder = Path(params["out_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    ups = [Path(u) for ids in params.get("upstream", {}).values() for u in ids]
    fds = [_take_lock(folder, fcntl.LOCK_EX)]  # a second runner on the same node waits here
    try:
        fds += [_take_lock(u, fcntl.LOCK_SH) for u in ups]
        up_markers = {u.name: read_marker(u) for u in ups}
        missing = [str(u) for u, m in zip(ups, up_markers.values()) if m is None]
        if missing:
            print(f"node {spec['stage']}/{folder.name}: upstream not complete: {', '.join(missing)}", file=sys.stderr)
            return 1
        code = provenance.code_version(Path(spec["notebook"]))
        marker = read_marker(folder)
        if marker is not None and (not spec.get("rerun") or is_current(marker, code["source_hash"], up_markers)):
            return EXIT_DONE_ELSEWHERE
        if marker is not None:  # a stale node: start from nothing (no resume from the old code's checkpoints)
            _clear_outputs(folder)
        _node_env(folder, Path(params["profile_dir"]).parent)
        started = time.time()
        if not _execute(spec, folder, spec["notebook"]):
            return 1
        marker = {"stage": spec["stage"], "node_id": folder.name, "seconds": round(time.time() - started, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "run": uuid.uuid4().hex,
                  "host": socket.gethostname(), "code": code,
                  "upstream_runs": {i: m["run"] for i, m in up_markers.items() if m.get("run")},
                  "outputs": sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                                    if p.is_file() and not p.name.startswith("."))}
        paths.atomic_write_text(folder / paths.MARKER, json.dumps(marker, indent=1))
        return 0
    finally:
        for fd in fds:
            os.close(fd)


def node_environment(jobs: int) -> dict:
    """Environment of a node's process (and its kernel): the cores shared out between parallel nodes.

    Small models on few cores are many times slower when parallel nodes each start one OpenMP
    thread per core (they spin against each other), so each node gets cores // jobs threads unless
    the user set OMP_NUM_THREADS.
    """
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# --------------------------------------------------------------------------- progress of a running node
def _bar_text(b: dict) -> str:
    text = f"{b['desc']} {b['n']}/{b['total'] or '?'} {b['unit']}"
    return text + (f", {b['rate']:.3g} {b['unit']}/s" if b.get("rate") else "")


def progress_line(n: Node, folder: Path, started: float, holder: Optional[dict] = None) -> str:
    """`02 nondp_cda0-sub_s0: train non-DP 23/47 step, 1.9 step/s` from the node's progress file."""
    state = node_progress.read(folder / paths.PROGRESS) or {}
    where = f" (another process: pid {holder.get('pid')} on {holder.get('host')})" if holder is not None else ""
    running = f"running for {time.time() - started:.0f} s"
    if state.get("bars"):
        quiet = time.time() - float(state.get("updated") or time.time())
        tail = f" (no update for {quiet:.0f} s)" if quiet > 120 else ""
        return f"{label(n)}{where}: {' | '.join(_bar_text(b) for b in state['bars'])}{tail}"
    if state.get("last"):
        return f"{label(n)}{where}: {running}; finished {_bar_text(state['last'])}"
    return f"{label(n)}{where}: {running}"


def skip_iri_format_checker() -> None:
    """Keep jsonschema from importing the optional `rfc3987_syntax` in this process.

    nbformat (so papermill and nbconvert) imports jsonschema, which imports `rfc3987_syntax` when it is
    installed (JupyterLab's dependencies bring it) only to check the "iri" string format, and that
    import compiles a Lark grammar: most of `import papermill`, paid by every node process (measured by
    `benchmarks/node_times.py --measure`). No notebook schema and nothing a node validates uses that
    format; jsonschema without the package simply has no "iri" checker."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)


if __name__ == "__main__":  # a node's child process: python -m dpbias_utils.pipeline.node NODE_JSON
    skip_iri_format_checker()
    sys.exit(execute_node(Path(sys.argv[1])))
