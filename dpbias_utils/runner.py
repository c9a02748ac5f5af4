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
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import paths
from .params import Profile

MARKER = "_COMPLETE.json"
STAGES = ("01", "02", "03", "04", "05")


@dataclass
class Node:
    """One papermill execution of a stage notebook."""

    stage: str
    node_id: str
    point: dict
    upstream: dict[str, list[str]] = field(default_factory=dict)  # stage -> upstream node ids
    run_id: Optional[str] = None  # training run this node belongs to ("base" for the base model)

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


def execute_node(spec_path: Path) -> int:
    """Run one node from its `node.json` (in a fresh process); returns an exit status."""
    import papermill as pm

    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["parameters"]["out_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second runner on the same node waits, then skips
        if (folder / MARKER).is_file():
            return 0
        started = time.time()
        out_nb = folder / "notebook.ipynb"
        try:
            pm.execute_notebook(
                spec["notebook"], str(out_nb), parameters=spec["parameters"], kernel_name="python3",
                cwd=str(folder), progress_bar=False, log_output=False,
            )
        except Exception as exc:  # the partly executed notebook stays for inspection
            try:
                render_html(out_nb, folder / "report.html")
            except Exception:
                pass
            print(f"node {spec['stage']}/{folder.name} failed: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr)
            return 1
        render_html(out_nb, folder / "report.html")
        marker = {"stage": spec["stage"], "node_id": folder.name, "seconds": round(time.time() - started, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "outputs": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))}
        paths.atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    return 0


def write_node_spec(profile: Profile, node: Node, profile_dir: Path, notebooks: Path) -> Path:
    folder = node.folder(profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"stage": node.stage, "notebook": str(Path(notebooks) / paths.STAGE_NOTEBOOKS[node.stage]),
            "parameters": node_parameters(profile, node, profile_dir)}
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


def run_node_subprocess(spec_path: Path, jobs: int = 1) -> int:
    """Execute a node in a child process; its log goes beside the notebook."""
    log = Path(spec_path).with_name("runner.log")
    with open(log, "ab") as fh:
        return subprocess.call([sys.executable, "-m", "dpbias_utils.runner", str(spec_path)], stdout=fh,
                               stderr=subprocess.STDOUT, env=node_environment(jobs))


# --------------------------------------------------------------------------- the whole graph
@dataclass
class RunReport:
    completed: list[Node] = field(default_factory=list)
    skipped: list[Node] = field(default_factory=list)
    failed: list[Node] = field(default_factory=list)
    blocked: list[Node] = field(default_factory=list)
    slurm_messages: dict[str, str] = field(default_factory=dict)  # "stage/node" -> why a Slurm job failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def prebuild_base(profile: Profile, progress: bool = True) -> None:
    """Build (or find cached) the built-in base model in this process with every core, before the
    node pool starts: otherwise the first stage-01 node builds it on cores // jobs threads while the
    others wait on its lock. Stage 01 then finds it in the cache."""
    from .params import BUILTIN

    if profile.model.base != BUILTIN:
        return
    from . import basemodel

    if progress:
        print(f"{profile.name}: built-in base model (built once, then cached under {paths.CACHE})", flush=True)
    basemodel.base_for_profile(profile)


def run(profile: Profile, *, jobs: int = 1, only: Optional[str] = None, runs_dir: Optional[Path] = None,
        notebooks: Optional[Path] = None, progress: bool = True, executor: str = "local") -> RunReport:
    """Execute every incomplete node whose upstream is complete; independent nodes in parallel."""
    from tqdm import tqdm

    from . import report

    profile_dir = paths.profile_dir(profile.name, runs_dir)
    notebooks = Path(notebooks or paths.NOTEBOOKS)
    nodes = plan(profile)
    if only:
        selected = [n for n in nodes if n.stage == only]
    else:
        selected = list(nodes)
    result = RunReport()
    done = {n.key for n in nodes if n.is_complete(profile_dir)}
    pending = [n for n in selected if n.key not in done]
    result.skipped = [n for n in selected if n.key in done]
    failed: set[tuple[str, str]] = set()

    def upstream_keys(n: Node):
        return [(s, i) for s, ids in n.upstream.items() for i in ids]

    if executor == "slurm":
        from . import slurm

        return slurm.run(profile, nodes, pending, profile_dir, notebooks, result, progress=progress)

    if any(n.stage == "01" for n in pending):
        prebuild_base(profile, progress)
    bar = tqdm(total=len(selected), initial=len(result.skipped), desc=f"{profile.name}: nodes", unit="node",
               disable=not progress)
    running = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            launched = False
            for n in list(pending):
                ups = upstream_keys(n)
                if any(u in failed for u in ups) or (only and any(u not in done for u in ups)):
                    pending.remove(n)
                    result.blocked.append(n)
                    failed.add(n.key)
                    bar.update(1)
                    continue
                if len(running) < max(1, jobs) and all(u in done for u in ups):
                    pending.remove(n)
                    spec = write_node_spec(profile, n, profile_dir, notebooks)
                    bar.set_postfix_str(f"{n.stage} {n.node_id}")
                    running[pool.submit(run_node_subprocess, spec, jobs)] = n
                    launched = True
            if not running:
                if pending and not launched:  # defensive: nothing can ever become runnable
                    result.blocked.extend(pending)
                    pending.clear()
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                n = running.pop(fut)
                if fut.result() == 0 and n.is_complete(profile_dir):
                    done.add(n.key)
                    result.completed.append(n)
                else:
                    failed.add(n.key)
                    result.failed.append(n)
                bar.update(1)
    bar.close()
    report.write_index(profile, nodes, profile_dir)
    return result


def describe_plan(profile: Profile, runs_dir: Optional[Path] = None) -> str:
    """The node plan as text (what `--dry-run` prints)."""
    profile_dir = paths.profile_dir(profile.name, runs_dir)
    nodes = plan(profile)
    lines = [f"profile {profile.name}: {len(nodes)} nodes -> {profile_dir}"]
    for stage in STAGES:
        group = [n for n in nodes if n.stage == stage]
        done = sum(n.is_complete(profile_dir) for n in group)
        lines.append(f"  stage {stage} ({paths.STAGE_NOTEBOOKS[stage]}): {len(group)} nodes, {done} complete")
        for n in group:
            status = "done" if n.is_complete(profile_dir) else "todo"
            lines.append(f"    [{status}] {n.node_id}")
    return "\n".join(lines)


if __name__ == "__main__":  # a node's child process: python -m dpbias_utils.runner NODE_JSON
    sys.exit(execute_node(Path(sys.argv[1])))
