"""The stage graph of a profile and its execution with papermill.

A profile's grid expands into nodes: stage 01 once per data configuration (mixing ratio, CDA
mode, seed), stages 02-04 once per training configuration, stage 04 once more for the base model
(`run_id` `base`), stage 05 once. A node's id is a readable label plus a hash of the parameters
its stage uses and of its upstream node ids, so changing a parameter re-runs exactly the nodes it
affects. A node is complete when `_COMPLETE.json` exists in its folder; it is written last, after
the executed notebook, its HTML rendering and the stage's outputs. Re-running skips complete
nodes, so an interrupted study resumes (stage 02 also resumes inside a run from its checkpoints).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import paths
from . import progress as node_progress
from .params import Profile

MARKER = paths.MARKER
STAGES = ("01", "02", "03", "04", "05")


@dataclass
class Node:
    """One papermill execution of a stage notebook."""

    stage: str
    node_id: str
    point: dict
    upstream: dict[str, list[str]] = field(default_factory=dict)  # stage -> upstream node ids
    run_id: Optional[str] = None  # training run this node belongs to ("base" for the base model)
    rerun: bool = False  # complete but stale: execute again unless its marker is current by then

    def folder(self, profile_dir: Path) -> Path:
        return Path(profile_dir) / paths.STAGE_DIRS[self.stage] / self.node_id

    def is_complete(self, profile_dir: Path) -> bool:
        return (self.folder(profile_dir) / MARKER).is_file()

    @property
    def key(self) -> tuple[str, str]:
        return (self.stage, self.node_id)


def _hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _fmt(x: float) -> str:
    return f"{x:g}"


def data_label(point: dict) -> str:
    mode = "sub" if point["cda_mode"] == "substitute" else "aug"
    return f"cda{_fmt(point['mixing_ratio'])}-{mode}_s{point['seed']}"


def train_label(point: dict) -> str:
    eps = point["epsilon"]
    privacy = "nondp" if eps is None else f"eps{_fmt(eps)}_C{_fmt(point['max_grad_norm'])}"
    return f"{privacy}_{data_label(point)}"


DATA_KEYS = ("mixing_ratio", "cda_mode", "seed")


def plan(profile: Profile) -> list[Node]:
    """All nodes of the profile, upstream before downstream."""
    dump = profile.model_dump(mode="json")
    nodes: dict[tuple[str, str], Node] = {}

    def add(node: Node) -> Node:
        nodes.setdefault(node.key, node)
        return nodes[node.key]

    def data_node(point: dict) -> Node:
        dpoint = {k: point[k] for k in DATA_KEYS}
        nid = f"{data_label(point)}-{_hash(['01', dump['data'], dump['model'], dpoint])}"
        return add(Node("01", nid, dpoint))

    points = profile.points()
    for point in points:
        n01 = data_node(point)
        tkey = ["02", dump["train"], dump["model"], point, n01.node_id]
        n02 = add(Node("02", f"{train_label(point)}-{_hash(tkey)}", point, {"01": [n01.node_id]}))
        n02.run_id = n02.node_id
        up = {"01": [n01.node_id], "02": [n02.node_id]}
        add(Node("03", f"{train_label(point)}-{_hash(['03', dump['gradnorms'], up])}", point, up, n02.run_id))
        add(Node("04", f"{train_label(point)}-{_hash(['04', dump['evaluation'], up])}", point, up, n02.run_id))
    if profile.include_base:
        base_point = {"epsilon": None, "mixing_ratio": 0.0, "cda_mode": "substitute",
                      "seed": points[0]["seed"], "max_grad_norm": profile.train.max_grad_norm}
        n01 = data_node(base_point)
        up = {"01": [n01.node_id]}
        add(Node("04", f"base-{_hash(['04', dump['evaluation'], dump['model'], up])}", base_point, up, "base"))
    ups: dict[str, list[str]] = {}
    for n in nodes.values():
        if n.stage in ("02", "03", "04"):
            ups.setdefault(n.stage, []).append(n.node_id)
    add(Node("05", f"report-{_hash(['05', ups])}", {}, ups))
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(nodes.values(), key=lambda n: order[n.stage])  # stable: grid order within a stage


def find_node(nodes: Iterable[Node], stage: str, point: Optional[dict] = None, run_id: Optional[str] = None) -> Node:
    """The node of `stage` for a grid point (matching only the keys the stage depends on)."""
    candidates = [n for n in nodes if n.stage == stage]
    if stage == "05":  # one report node per profile, whatever the point
        return candidates[0]
    if run_id is not None:
        candidates = [n for n in candidates if n.run_id == run_id]
    if point is not None:
        keys = DATA_KEYS if stage == "01" else tuple(point)
        candidates = [n for n in candidates if all(n.point.get(k) == point.get(k) for k in keys)
                      and (stage == "05" or n.run_id != "base" or run_id == "base")]
    if not candidates:
        raise LookupError(f"no stage {stage} node for point {point} (run {run_id}) in this profile's grid")
    return candidates[0]


# --------------------------------------------------------------------------- execution of one node
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


def render_html(notebook_path: Path, html_path: Path) -> None:
    """HTML report of an executed notebook without code input (what readers open).

    Progress bars and library warnings (stderr) are left out of the report; they stay in the
    executed notebook beside it, and errors are always shown.
    """
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook_path, as_version=4)
    for cell in nb.cells:
        if cell.get("outputs"):
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    paths.atomic_write_text(html_path, body)


EXIT_DONE_ELSEWHERE = 3  # execute_node found the node completed by another process: nothing run here
LOCK = ".lock"
PROGRESS = ".progress.json"


def _open_lock(folder: Path) -> int:
    return os.open(Path(folder) / LOCK, os.O_RDWR | os.O_CREAT, 0o666)


def lock_holder(folder: Path) -> Optional[dict]:
    """Who holds the node's lock ({"pid", "host", "started"}), or None when nobody does.

    The lock is `fcntl.flock` on `<node>/.lock`: the OS releases it when its process dies, so a
    killed run leaves no stale lock behind. A node's own execution holds it exclusively; nodes
    that read it (downstream) hold it shared while they run, so it is never rewritten under them.
    """
    if not (Path(folder) / LOCK).is_file():
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
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_current(marker: Optional[dict], source: str, upstream_markers: dict[str, Optional[dict]]) -> bool:
    """A marker is current when this source hash wrote it and its upstream nodes have not been
    recomputed since (each upstream marker's `run` is the one it read)."""
    if not marker or (marker.get("code") or {}).get("source_hash") != source:
        return False
    seen = marker.get("upstream_runs") or {}
    return all(m is not None and seen.get(i) == m.get("run") for i, m in upstream_markers.items())


def _execute(spec: dict, folder: Path, notebook: str) -> bool:
    """papermill on the node; renders the report even after a failure (the partial notebook stays)."""
    import papermill as pm

    out_nb = folder / "notebook.ipynb"
    try:
        pm.execute_notebook(notebook, str(out_nb), parameters=spec["parameters"], kernel_name="python3",
                            cwd=str(folder), progress_bar=False, log_output=False)
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
    os.environ.update({node_progress.ENV: str(folder / PROGRESS), "DPBIAS_RUNS": str(runs_root)})
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own switch; progress.tqdm ignores it


def _clear_outputs(folder: Path) -> None:
    """Remove a node's outputs, marker first; keep its spec, lock and log."""
    (folder / MARKER).unlink(missing_ok=True)
    for p in folder.iterdir():
        if p.name in ("node.json", LOCK, "runner.log"):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def execute_node(spec_path: Path) -> int:
    """Run one node from its `node.json` (in a fresh process); returns an exit status.

    Holds the node's lock exclusively and its upstream nodes' locks shared while it runs. A node
    already complete when the lock is obtained (another process finished it meanwhile) is not run
    again (EXIT_DONE_ELSEWHERE); with `"rerun": true` in the spec a complete node is run again
    unless its marker is current (then another process already redid it).
    """
    from . import provenance

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
        paths.atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
        return 0
    finally:
        for fd in fds:
            os.close(fd)


def write_node_spec(profile: Profile, node: Node, profile_dir: Path, notebooks: Path) -> Path:
    folder = node.folder(profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"stage": node.stage, "notebook": str(Path(notebooks) / paths.STAGE_NOTEBOOKS[node.stage]),
            "parameters": node_parameters(profile, node, profile_dir), "rerun": node.rerun}
    path = folder / "node.json"
    paths.atomic_write_text(path, json.dumps(spec, indent=1))
    return path


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


class _Children:
    """The node processes this runner started, so that an interrupt reaches them and is waited for."""

    def __init__(self):
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def run(self, spec_path: Path, jobs: int) -> int:
        """Execute a node in a child process; its log goes beside the notebook."""
        with open(Path(spec_path).with_name("runner.log"), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "dpbias_utils.runner", str(spec_path)], stdout=log,
                                    stderr=subprocess.STDOUT, env=node_environment(jobs))
            with self.lock:
                self.procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.procs.discard(proc)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGINT to every child (papermill then shuts its kernel down), SIGKILL after `grace_s`."""
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + grace_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


# --------------------------------------------------------------------------- the whole graph
PROGRESS_EVERY_S = 10.0  # a console line per running node this often


@dataclass
class RunReport:
    completed: list[Node] = field(default_factory=list)
    skipped: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)
    blocked: list[Node] = field(default_factory=list)
    elsewhere: list[Node] = field(default_factory=list)  # completed by another process while this one waited
    stale_code: list[Node] = field(default_factory=list)  # complete, but computed by other code
    stale_upstream: list[Node] = field(default_factory=list)  # complete, but an upstream node is stale or was redone
    rerun_stale: bool = False
    slurm_messages: dict[str, str] = field(default_factory=dict)  # "stage/node" -> why a Slurm job failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def stale_message(self) -> Optional[str]:
        n_code, n_up = len(self.stale_code), len(self.stale_upstream)
        if not n_code + n_up:
            return None
        what = (f"{n_code} complete node(s) were computed by other code (another source hash: see the README's "
                f"runner section) and {n_up} more depend on redone or stale nodes")
        if self.rerun_stale:
            return f"{what}: redoing these {n_code + n_up} (--rerun-stale)"
        return f"{what}: kept; run with --rerun-stale to redo these {n_code + n_up}"


def prebuild_base(profile: Profile, progress: bool = True, runs_dir: Optional[Path] = None) -> None:
    """Build (or find cached) the built-in base model in this process with every core, before the
    node pool starts: otherwise the first stage-01 node builds it on cores // jobs threads while the
    others wait on its lock. Stage 01 then finds it in the cache."""
    from .params import BUILTIN

    if profile.model.base != BUILTIN:
        return
    from . import basemodel

    cache = paths.cache_dir(runs_dir)
    if progress:
        print(f"{profile.name}: built-in base model (built once, then cached under {cache})", flush=True)
    basemodel.base_for_profile(profile, cache)


def label(n: Node) -> str:
    """`02 eps8_C0.1_cda0-sub_s0`: the stage and the node id without its hash."""
    return f"{n.stage} {n.node_id.rsplit('-', 1)[0]}"


def _upstream_keys(n: Node) -> list[tuple[str, str]]:
    return [(s, i) for s, ids in n.upstream.items() for i in ids]


def find_stale(nodes: list[Node], profile_dir: Path, notebooks: Path) -> dict[tuple[str, str], str]:
    """Complete nodes to redo: "code" when their marker's source hash is not the current one for
    their stage (package + notebook), "upstream" when an upstream node is stale or was recomputed
    after they read it. `nodes` in plan order (upstream first)."""
    from . import provenance

    sources = {st: provenance.source_hash(Path(notebooks) / nb) for st, nb in paths.STAGE_NOTEBOOKS.items()
               if (Path(notebooks) / nb).is_file()}
    markers = {n.key: read_marker(n.folder(profile_dir)) for n in nodes}
    stale: dict[tuple[str, str], str] = {}
    for n in nodes:
        m = markers[n.key]
        if m is None:
            continue
        if (m.get("code") or {}).get("source_hash") != sources.get(n.stage):
            stale[n.key] = "code"
        elif any(u in stale for u in _upstream_keys(n)) or not is_current(
                m, sources.get(n.stage), {i: markers.get((st, i)) for st, i in _upstream_keys(n)}):
            stale[n.key] = "upstream"
    return stale


def _bar_text(b: dict) -> str:
    text = f"{b['desc']} {b['n']}/{b['total'] or '?'} {b['unit']}"
    return text + (f", {b['rate']:.3g} {b['unit']}/s" if b.get("rate") else "")


def progress_line(n: Node, folder: Path, started: float, holder: Optional[dict] = None) -> str:
    """`02 nondp_cda0-sub_s0: train non-DP 23/47 step, 1.9 step/s` from the node's progress file."""
    state = node_progress.read(folder / PROGRESS) or {}
    where = f" (another process: pid {holder.get('pid')} on {holder.get('host')})" if holder is not None else ""
    running = f"running for {time.time() - started:.0f} s"
    if state.get("bars"):
        quiet = time.time() - float(state.get("updated") or time.time())
        tail = f" (no update for {quiet:.0f} s)" if quiet > 120 else ""
        return f"{label(n)}{where}: {' | '.join(_bar_text(b) for b in state['bars'])}{tail}"
    if state.get("last"):
        return f"{label(n)}{where}: {running}; finished {_bar_text(state['last'])}"
    return f"{label(n)}{where}: {running}"


class _LocalRun:
    """The local executor's loop: launch runnable nodes (at most `jobs` at a time), wait for nodes
    another process is computing, report progress, stop the children on an interrupt."""

    def __init__(self, nodes, pending, done, result, profile, profile_dir, notebooks, jobs, only, say):
        self.pending, self.done, self.result, self.say = pending, done, result, say
        self.profile, self.profile_dir, self.notebooks = profile, profile_dir, notebooks
        self.jobs, self.only, self.total = max(1, jobs), only, len(pending) + len(result.skipped)
        self.failed: set[tuple[str, str]] = set()
        self.running: dict = {}  # future -> (node, start time)
        self.waiting: dict[tuple[str, str], tuple[Node, float]] = {}  # computed by another process
        self.children = _Children()
        self.last_progress = time.time()

    def finished(self) -> int:
        r = self.result
        return len(r.skipped) + len(r.completed) + len(r.elsewhere) + len(r.failed) + len(r.blocked)

    def _block(self, n: Node) -> None:
        self.pending.remove(n)
        self.result.blocked.append(n)
        self.failed.add(n.key)

    def _launch(self, pool) -> None:
        for n in list(self.pending):
            ups = _upstream_keys(n)
            if any(u in self.failed for u in ups) or (self.only and any(u not in self.done for u in ups)):
                self._block(n)
                continue
            if len(self.running) >= self.jobs or not all(u in self.done for u in ups):
                continue
            self.pending.remove(n)
            folder = n.folder(self.profile_dir)
            holder = None if n.is_complete(self.profile_dir) else lock_holder(folder)
            if holder is not None:
                self.waiting[n.key] = (n, time.time())
                self.say(f"{label(n)}: being computed by another process (pid {holder.get('pid')} on "
                         f"{holder.get('host')}); waiting for it")
                continue
            spec = write_node_spec(self.profile, n, self.profile_dir, self.notebooks)
            self.running[pool.submit(self.children.run, spec, self.jobs)] = (n, time.time())
            self.say(f"{label(n)}: started")

    def _collect_waiting(self) -> None:
        for key, (n, _) in list(self.waiting.items()):
            if lock_holder(n.folder(self.profile_dir)) is not None:
                continue
            del self.waiting[key]
            if n.is_complete(self.profile_dir):
                self._finish(n, EXIT_DONE_ELSEWHERE, None)
            else:  # the other process failed or was killed: run it here
                self.pending.insert(0, n)

    def _finish(self, n: Node, rc: int, started: Optional[float]) -> None:
        r = self.result
        if rc in (0, EXIT_DONE_ELSEWHERE) and n.is_complete(self.profile_dir):
            self.done.add(n.key)
            (r.completed if rc == 0 else r.elsewhere).append(n)
            how = f"done in {time.time() - started:.0f} s" if rc == 0 else "computed by another process"
        else:
            self.failed.add(n.key)
            r.failed.append(n)
            how = f"FAILED (see {n.folder(self.profile_dir) / 'runner.log'})"
            paths.check_writable(self.profile_dir)  # a full or read-only runs folder stops the study here
        self.say(f"{label(n)}: {how} [{self.finished()}/{self.total} nodes]")

    def _report_progress(self) -> None:
        if time.time() - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = time.time()
        for n, started in self.running.values():
            self.say(progress_line(n, n.folder(self.profile_dir), started))
        for n, started in self.waiting.values():
            folder = n.folder(self.profile_dir)
            self.say(progress_line(n, folder, started, lock_holder(folder) or {}))

    def loop(self) -> None:
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            while self.pending or self.running or self.waiting:
                self._launch(pool)
                self._collect_waiting()
                if not self.running and not self.waiting:
                    if self.pending and not any(all(u in self.done for u in _upstream_keys(n)) for n in self.pending):
                        self.result.blocked.extend(self.pending)  # defensive: nothing can become runnable
                        self.pending.clear()
                    continue
                if self.running:
                    ended, _ = wait(list(self.running), timeout=1.0, return_when=FIRST_COMPLETED)
                else:
                    ended = []
                    time.sleep(1.0)
                for fut in ended:
                    n, started = self.running.pop(fut)
                    self._finish(n, fut.result(), started)
                self._report_progress()
        except BaseException:
            self.children.stop()
            raise
        finally:
            pool.shutdown(wait=True)


def run(profile: Profile, *, jobs: int = 1, only: Optional[str] = None, runs_dir: Optional[Path] = None,
        notebooks: Optional[Path] = None, progress: bool = True, executor: str = "local",
        rerun_stale: bool = False) -> RunReport:
    """Execute every incomplete node whose upstream is complete; independent nodes in parallel.

    Complete nodes computed by other code, and their downstream, are counted (`stale_code`,
    `stale_upstream`) and redone with `rerun_stale`. Raises paths.RunsDirError when the runs folder
    cannot be written; on KeyboardInterrupt the node processes are stopped first.
    """
    from . import report

    profile_dir = paths.profile_dir(profile.name, runs_dir)
    paths.check_writable(profile_dir)
    notebooks = Path(notebooks or paths.NOTEBOOKS)
    nodes = plan(profile)
    selected = [n for n in nodes if n.stage == only] if only else list(nodes)
    result = RunReport(rerun_stale=rerun_stale)
    stale = find_stale(nodes, profile_dir, notebooks)
    result.stale_code = [n for n in nodes if stale.get(n.key) == "code"]
    result.stale_upstream = [n for n in nodes if stale.get(n.key) == "upstream"]
    done = {n.key for n in nodes if n.is_complete(profile_dir) and not (rerun_stale and n.key in stale)}
    for n in nodes:
        n.rerun = rerun_stale and n.key in stale
    pending = [n for n in selected if n.key not in done]
    result.skipped = [n for n in selected if n.key in done]

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    say(f"{profile.name}: {len(selected)} nodes, {len(result.skipped)} already complete -> {profile_dir}")
    if result.stale_message():
        say(result.stale_message())
    if executor == "slurm":
        from . import slurm

        return slurm.run(profile, nodes, pending, profile_dir, notebooks, result, progress=progress)
    if any(n.stage == "01" for n in pending):
        prebuild_base(profile, progress, runs_dir)
    _LocalRun(nodes, pending, done, result, profile, profile_dir, notebooks, jobs, only, say).loop()
    report.write_index(profile, nodes, profile_dir)
    return result


def describe_plan(profile: Profile, runs_dir: Optional[Path] = None, notebooks: Optional[Path] = None) -> str:
    """The node plan as text (what `--dry-run` prints): done, stale (done by other code or over a
    stale upstream: `--rerun-stale` redoes it) or todo."""
    profile_dir = paths.profile_dir(profile.name, runs_dir)
    nodes = plan(profile)
    stale = find_stale(nodes, profile_dir, Path(notebooks or paths.NOTEBOOKS))
    lines = [f"profile {profile.name}: {len(nodes)} nodes -> {profile_dir}"]
    for stage in STAGES:
        group = [n for n in nodes if n.stage == stage]
        done = sum(n.is_complete(profile_dir) for n in group)
        n_stale = sum(n.key in stale for n in group)
        lines.append(f"  stage {stage} ({paths.STAGE_NOTEBOOKS[stage]}): {len(group)} nodes, {done} complete"
                     + (f" ({n_stale} stale)" if n_stale else ""))
        for n in group:
            status = "stale" if n.key in stale else "done" if n.is_complete(profile_dir) else "todo"
            lines.append(f"    [{status}] {n.node_id}")
    return "\n".join(lines)


if __name__ == "__main__":  # a node's child process: python -m dpbias_utils.runner NODE_JSON
    sys.exit(execute_node(Path(sys.argv[1])))
