"""Run a profile's stage graph on Slurm with submitit (`dpbias run PROFILE --executor slurm`).

One job array per stage, stages in order: the array of stage k is submitted when every job of
stage k-1 has finished (the driver waits, polling), so a node only starts when its upstream nodes
are complete. Each array task runs `node.execute_node(node.json)` -- the same function, the
same node folders and the same `_COMPLETE.json` markers as local execution -- so:

* re-submitting a profile never resubmits a complete node (`run.run` filters them out first);
* a task that is pre-empted or reaches its time limit is re-queued by submitit (its callable is
  `submitit.helpers.Checkpointable`, up to `execution.slurm_max_requeue` times) and re-runs its
  node, which resumes from the node's checkpoints (stage 02) or starts it again;
* a node whose upstream failed (or is missing, with `--only`) is reported as blocked, not run.

Resources per stage come from `profile.execution.resources` (GPUs per node, CPUs per task, memory,
time limit; `StageResources` defaults otherwise), the partition from the stage's `partition`, else
`execution.slurm_partition`, GPUs as `--gpus-per-node` or `--gres=gpu:N` (`execution.slurm_gpu_request`);
a submission sbatch rejects fails that stage's nodes (their downstream is blocked), not the driver;
every job runs with the Hugging Face libraries offline (run `dpbias prefetch` first);
extra sbatch flags from `execution.slurm_additional_parameters`, shell set-up lines from
`execution.slurm_setup`. Jobs inherit the submitting environment (sbatch's default) and run the
submitting Python (`sys.executable`), so the run directory and the virtual environment must be
on a file system shared by the login and compute nodes. submitit's pickles and logs go to
`<run dir>/<profile>/_slurm/<stage>/` (`<array id>_<task>_log.out` / `.err`).

Job states: submitit asks `sacct`; on clusters without accounting (the test cluster), the driver
also asks `squeue`, and a task that has left the queue without a result is a failed node.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import paths
from ..params import Profile, StageResources
from . import node as node_exec
from .graph import STAGES, Node, upstream_keys

__all__ = ["run", "NodeJob", "SlurmOutcome", "executor_for_stage", "stage_parameters", "slurm_available"]

LOG_DIR = "_slurm"


class _CheckpointableBase:  # replaced by submitit.helpers.Checkpointable when submitit is importable
    pass


try:  # submitit is a declared dependency; the fallback keeps `import dpbias_utils.pipeline.slurm` cheap and safe
    from submitit.helpers import Checkpointable as _CheckpointableBase  # type: ignore[no-redef]  # noqa: F811
except ImportError:  # pragma: no cover
    pass


class NodeJob(_CheckpointableBase):
    """The callable of every array task: execute one node from its spec; re-queued when pre-empted."""

    def __call__(self, spec_path: str) -> dict:
        import os
        import socket

        started = time.time()
        rc = node_exec.execute_node(Path(spec_path))
        return {"spec": str(spec_path), "rc": int(rc), "host": socket.gethostname(),
                "job_id": os.environ.get("SLURM_JOB_ID"), "seconds": round(time.time() - started, 1)}


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def stage_parameters(profile: Profile, stage: str, n_tasks: int) -> dict:
    """SlurmExecutor.update_parameters keywords of one stage's array."""
    ex = profile.execution
    res: StageResources = ex.resources.get(stage) or StageResources()
    params = {
        "job_name": f"dpbias-{profile.name}-{stage}",
        "time": int(res.time_min),
        "mem": f"{int(res.mem_gb)}GB",
        "cpus_per_task": int(res.cpus),
        "nodes": 1,
        "ntasks_per_node": 1,
        "array_parallelism": int(ex.slurm_array_parallelism or max(1, n_tasks)),
        "signal_delay_s": 120,
    }
    if res.gpus:  # no --gpus-per-node=0 flag: clusters without GRES reject it
        if ex.slurm_gpu_request == "gres":
            params["gres"] = f"gpu:{int(res.gpus)}"
        else:
            params["gpus_per_node"] = int(res.gpus)
    if res.partition or ex.slurm_partition:
        params["partition"] = res.partition or ex.slurm_partition
    if ex.slurm_additional_parameters:
        params["additional_parameters"] = dict(ex.slurm_additional_parameters)
    # Jobs never download: `dpbias prefetch` filled the caches on a machine with network first.
    params["setup"] = [JOB_OFFLINE, *ex.slurm_setup]
    return params


JOB_OFFLINE = "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1"


def executor_for_stage(profile: Profile, stage: str, profile_dir: Path, n_tasks: int):
    import submitit

    folder = Path(profile_dir) / LOG_DIR / stage
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.execution.slurm_max_requeue,
                                      python=sys.executable)
    executor.update_parameters(**stage_parameters(profile, stage, n_tasks))
    return executor


def _squeue_ids(job_ids: list[str]) -> Optional[set[str]]:
    """Ids (`<array>_<task>`) of these jobs still in the queue; None when squeue cannot answer."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue fails for ids that have left the controller's memory (MinJobAge): treat as none queued
        return set() if "Invalid job id" in out.stderr else None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _wait(jobs: list, poll_s: float, bar=None, grace_polls: int = 3, on_poll=None) -> dict[int, str]:
    """Wait for every job; returns {index: 'done' | 'lost'} ('lost': left the queue without a result).
    `on_poll(open indices)` is called once per poll (progress lines)."""
    state: dict[int, str] = {}
    absent: dict[int, int] = {}
    while len(state) < len(jobs):
        if on_poll is not None:
            on_poll([i for i in range(len(jobs)) if i not in state])
        open_idx = [i for i in range(len(jobs)) if i not in state]
        for i in open_idx:
            if jobs[i].done():
                state[i] = "done"
                if bar is not None:
                    bar.update(1)
        open_idx = [i for i in open_idx if i not in state]
        if not open_idx:
            break
        queued = _squeue_ids([jobs[i].job_id for i in open_idx])
        if queued is not None:
            for i in open_idx:
                if jobs[i].job_id in queued:
                    absent.pop(i, None)
                    continue
                absent[i] = absent.get(i, 0) + 1
                if absent[i] > grace_polls and not jobs[i].paths.result_pickle.exists():
                    state[i] = "lost"
                    if bar is not None:
                        bar.update(1)
        time.sleep(poll_s)
    return state


def _outcome(job, status: str) -> tuple[bool, str]:
    """(succeeded, message) of a finished task."""
    if status == "lost":
        return False, f"job {job.job_id} left the queue without a result (see {job.paths.stderr})"
    try:
        out = job.result()
    except Exception as err:  # noqa: BLE001 - the node failed inside the job
        return False, f"job {job.job_id} raised {type(err).__name__}: {str(err)[-500:]}"
    if out.get("rc", 1) not in (0, node_exec.EXIT_DONE_ELSEWHERE):
        return False, f"job {job.job_id} on {out.get('host')}: node failed (rc {out.get('rc')}); see {job.paths.stderr}"
    return True, f"job {job.job_id} on {out.get('host')} in {out.get('seconds')} s"


def _progress_printer(runnable: list, profile_dir: Path, bar, enabled: bool):
    """A line per running node (from its progress file on the shared file system) every
    node.PROGRESS_EVERY_S, printed above the stage bar."""
    started, last = time.time(), [0.0]

    def show(open_idx: list[int]) -> None:
        if not enabled or time.time() - last[0] < node_exec.PROGRESS_EVERY_S:
            return
        last[0] = time.time()
        for i in open_idx:
            folder = runnable[i].folder(profile_dir)
            if (folder / paths.PROGRESS).is_file():
                bar.write(node_exec.progress_line(runnable[i], folder, started))

    return show


@dataclass
class SlurmOutcome:
    """What became of the pending nodes: done, failed (with why) or blocked by an upstream failure."""

    completed: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)
    blocked: list[Node] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)  # "stage/node" -> the job's outcome


def run(profile: Profile, nodes: list[Node], pending: list[Node], profile_dir: Path, notebooks: Path,
        n_skipped: int = 0, progress: bool = True) -> SlurmOutcome:
    """Execute `pending` (incomplete nodes, stage order) on Slurm, one job array per stage."""
    from tqdm import tqdm

    if not slurm_available():
        raise RuntimeError("--executor slurm needs Slurm's sbatch and squeue on PATH (run on a login node)")
    import submitit  # noqa: F401 - fail early with a clear ImportError

    profile_dir = Path(profile_dir)
    by_key = {n.key: n for n in nodes}
    failed: set[tuple[str, str]] = set()
    messages: dict[tuple[str, str], str] = {}
    result = SlurmOutcome()
    bar = tqdm(total=len(pending) + n_skipped, initial=n_skipped,
               desc=f"{profile.name}: nodes (slurm)", unit="node", disable=not progress)
    poll_s = float(profile.execution.slurm_poll_s)
    try:
        for stage in STAGES:
            group = [n for n in pending if n.stage == stage]
            if not group:
                continue
            runnable = []
            for n in group:
                if any(u in failed or not by_key[u].is_complete(profile_dir) for u in upstream_keys(n)):
                    result.blocked.append(n)
                    failed.add(n.key)
                    bar.update(1)
                else:
                    runnable.append(n)
            if not runnable:
                continue
            specs = [str(node_exec.write_node_spec(profile, n, profile_dir, notebooks)) for n in runnable]
            executor = executor_for_stage(profile, stage, profile_dir, len(runnable))
            bar.set_postfix_str(f"stage {stage}: {len(runnable)} jobs")
            try:
                jobs = executor.map_array(NodeJob(), specs)
            except Exception as err:  # noqa: BLE001 - sbatch refused (partition, GRES, limits): the nodes fail
                msg = f"submission of stage {stage} rejected: {type(err).__name__}: {str(err).strip()[-500:]}"
                for n in runnable:
                    messages[n.key] = msg
                    failed.add(n.key)
                    result.failed.append(n)
                    bar.update(1)
                print(f"slurm: {msg}", file=sys.stderr)
                continue
            try:
                status = _wait(jobs, poll_s, bar, on_poll=_progress_printer(runnable, profile_dir, bar, progress))
            except BaseException:  # interrupted driver: do not leave this stage's jobs running unattended
                for j in jobs:
                    try:
                        j.cancel(check=False)
                    except Exception:  # noqa: BLE001
                        pass
                raise
            for i, (n, job) in enumerate(zip(runnable, jobs)):
                ok, msg = _outcome(job, status.get(i, "lost"))
                messages[n.key] = msg
                if ok and n.is_complete(profile_dir):
                    result.completed.append(n)
                else:
                    failed.add(n.key)
                    result.failed.append(n)
                    print(f"slurm: node {n.stage}/{n.node_id} failed: {msg}", file=sys.stderr)
    finally:
        bar.close()
    result.messages = {f"{s}/{i}": m for (s, i), m in messages.items()}
    return result
