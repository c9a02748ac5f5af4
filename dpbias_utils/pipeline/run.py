"""A profile's whole stage graph: every incomplete node whose upstream is complete, independent
nodes in parallel (a local pool of node processes) or one Slurm job array per stage (`slurm`);
stale nodes (computed by other code) counted and, on request, redone; a progress line per
running node; the plan as text (`--dry-run`).

The two calls into the science are hooks the caller supplies (`dpbias_utils.cli.run`): `prepare`
before the local pool starts and `write_index` after either executor.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .. import paths
from ..params import Profile
from . import node as node_exec
from . import provenance
from .graph import STAGES, Node, label, plan, upstream_keys
from .node import EXIT_DONE_ELSEWHERE, PROGRESS_EVERY_S, is_current, lock_holder, progress_line, read_marker, write_node_spec

Prepare = Callable[[Profile, Optional[Path], bool, int], None]  # (profile, runs_dir, progress, jobs)
WriteIndex = Callable[[Profile, list, Path], object]  # (profile, nodes, profile_dir)


class _Worker:
    """One warm node worker (`pipeline.worker`): its process, in a process group of its own with the
    node children it forks."""

    def __init__(self, env: dict, log: Path):
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "dpbias_utils.pipeline.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env, text=True, bufsize=1,
                                         start_new_session=True)
        self.ready = self.proc.stdout.readline().strip() == "ready"

    def run(self, spec_path: Path) -> Optional[int]:
        """The node's exit status, or None when the worker itself died (its log says why)."""
        try:
            self.proc.stdin.write(f"{spec_path}\n")
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            return None
        return int(line) if line.strip().lstrip("-").isdigit() else None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass


class _Children:
    """The node processes this runner started, so that an interrupt reaches them and is waited for.

    Each node runs in a child forked by one of `jobs` warm workers (`pipeline.worker`: torch, papermill
    and the package imported once per worker, not once per node); a worker that dies is replaced. Where
    the OS cannot fork, or with ``DPBIAS_NODE_ENGINE=kernel``, a node is a fresh process of its own."""

    def __init__(self, log_dir: Path):
        self.procs: set[subprocess.Popen] = set()
        self.workers: list[_Worker] = []  # all started, to stop
        self.idle: "queue.SimpleQueue[_Worker]" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.log_dir = log_dir
        self.use_workers = hasattr(os, "fork") and node_exec.engine() == "inprocess"

    def run(self, spec_path: Path, jobs: int) -> int:
        """Execute a node in a child process; its log goes beside the notebook."""
        if not self.use_workers:
            return self._run_process(spec_path, jobs)
        try:
            worker = self.idle.get_nowait()
        except queue.Empty:
            worker = _Worker(node_exec.node_environment(jobs), self.log_dir / paths.WORKER_LOG)
            with self.lock:
                self.workers.append(worker)
        rc = worker.run(spec_path) if worker.ready else None
        if rc is None:  # the worker died (see its log): this node runs as a process of its own
            worker.close()
            return self._run_process(spec_path, jobs)
        self.idle.put(worker)
        return rc

    def _run_process(self, spec_path: Path, jobs: int) -> int:
        with open(Path(spec_path).with_name(paths.NODE_LOG), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "dpbias_utils.pipeline.node", str(spec_path)], stdout=log,
                                    stderr=subprocess.STDOUT, env=node_exec.node_environment(jobs))
            with self.lock:
                self.procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.procs.discard(proc)

    def close(self) -> None:
        """End the idle workers (end of their input)."""
        for w in self.workers:
            w.close()
        for w in self.workers:
            try:
                w.proc.wait(30)
            except subprocess.TimeoutExpired:
                w.signal(signal.SIGKILL)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGINT to every child (papermill then shuts its kernel down; a forked node fails with
        KeyboardInterrupt), SIGKILL after `grace_s`."""
        with self.lock:
            procs, workers = list(self.procs), list(self.workers)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for w in workers:
            w.signal(signal.SIGINT)
            w.close()
        deadline = time.time() + grace_s
        for p in procs + [w.proc for w in workers]:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        for w in workers:
            w.signal(signal.SIGKILL)  # a forked node still running after the grace period


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
    n_redo: int = 0  # stale nodes redone: all of them, or the `--only` stage's
    slurm_messages: dict[str, str] = field(default_factory=dict)  # "stage/node" -> why a Slurm job failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def stale_message(self) -> Optional[str]:
        n_code, n_up = len(self.stale_code), len(self.stale_upstream)
        if not n_code + n_up:
            return None
        what = (f"{n_code} complete node(s) were computed by other code (another source hash: see "
                f"docs/running.md) and {n_up} more depend on redone or stale nodes")
        if self.rerun_stale:
            return f"{what}: redoing {self.n_redo} of these {n_code + n_up} (--rerun-stale; --only keeps the others)"
        return f"{what}: kept; run with --rerun-stale to redo these {n_code + n_up}"


def find_stale(nodes: list[Node], profile_dir: Path, notebooks: Path) -> dict[tuple[str, str], str]:
    """Complete nodes to redo: "code" when their marker's source hash is not the current one for
    their stage (package + notebook), "upstream" when an upstream node is stale or was recomputed
    after they read it. `nodes` in plan order (upstream first)."""
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
        elif any(u in stale for u in upstream_keys(n)) or not is_current(
                m, sources.get(n.stage), {i: markers.get((st, i)) for st, i in upstream_keys(n)}):
            stale[n.key] = "upstream"
    return stale


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
        self.children = _Children(profile_dir)
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
            ups = upstream_keys(n)
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
            how = f"FAILED (see {n.folder(self.profile_dir) / paths.NODE_LOG})"
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
                    if self.pending and not any(all(u in self.done for u in upstream_keys(n)) for n in self.pending):
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
            self.children.close()


def run(profile: Profile, *, jobs: int = 1, only: Optional[str] = None, runs_dir: Optional[Path] = None,
        notebooks: Optional[Path] = None, progress: bool = True, executor: str = "local",
        rerun_stale: bool = False, prepare: Optional[Prepare] = None,
        write_index: Optional[WriteIndex] = None) -> RunReport:
    """Execute every incomplete node whose upstream is complete; independent nodes in parallel.

    Complete nodes computed by other code, and their downstream, are counted (`stale_code`,
    `stale_upstream`) and redone with `rerun_stale`. Raises paths.RunsDirError when the runs folder
    cannot be written; on KeyboardInterrupt the node processes are stopped first. Hooks:
    `prepare(profile, runs_dir, progress, jobs)` runs in this process before the local pool when a stage-01
    node is pending; `write_index(profile, nodes, profile_dir)` after either executor.
    """
    profile_dir = paths.profile_dir(profile.name, runs_dir)
    paths.check_writable(profile_dir)
    notebooks = Path(notebooks or paths.NOTEBOOKS)
    nodes = plan(profile)
    selected = [n for n in nodes if n.stage == only] if only else list(nodes)
    result = RunReport(rerun_stale=rerun_stale)
    stale = find_stale(nodes, profile_dir, notebooks)
    result.stale_code = [n for n in nodes if stale.get(n.key) == "code"]
    result.stale_upstream = [n for n in nodes if stale.get(n.key) == "upstream"]
    redo = {n.key for n in selected if n.key in stale} if rerun_stale else set()  # `--only`: that stage's alone
    done = {n.key for n in nodes if n.is_complete(profile_dir) and n.key not in redo}
    for n in nodes:
        n.rerun = n.key in redo
    result.n_redo = len(redo)
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

        out = slurm.run(profile, nodes, pending, profile_dir, notebooks, len(result.skipped), progress=progress)
        result.completed, result.failed, result.blocked = out.completed, out.failed, out.blocked
        result.slurm_messages = out.messages
    else:
        if prepare is not None and any(n.stage == "01" for n in pending):
            prepare(profile, runs_dir, progress, jobs)
        _LocalRun(nodes, pending, done, result, profile, profile_dir, notebooks, jobs, only, say).loop()
    if write_index is not None:
        write_index(profile, nodes, profile_dir)
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
