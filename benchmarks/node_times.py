"""Where a finished study's node time goes: by stage, and the fixed cost every node pays.

From a finished profile folder (``runs/<profile>``), with no re-running:

* per stage: nodes, node-seconds (sum, mean, max) from each node's ``_COMPLETE.json`` (the wall
  time of papermill + HTML report, what the runner waits for), and the study's span (first node
  start to last node end; the base-model build before the first node is not in it);
* per stage, the mean split of a node from its executed ``notebook.ipynb`` (papermill's per-cell
  times): ``kernel`` (papermill start to the first cell: kernel start), ``imports`` (the first
  cell: torch / transformers / dpbias_utils), ``work`` (every other cell; model loads happen in
  there), ``other`` (marker seconds minus papermill's own duration: the node process importing
  papermill before the notebook starts, the HTML report after it);

the node workers' one-off import time (``.workers.log`` of the profile folder: the local runner's
workers import torch, transformers, papermill and the package once each and fork every node from
themselves, `dpbias_utils.pipeline.worker`; their nodes then show ``kernel`` and ``imports`` near 0);

and measured here, side by side on this machine (``--measure``, a few seconds each, the minimum of
``--repeat`` tries): the node process's own imports (papermill, nbconvert), a fresh Python process
that imports what a node's first cell imports, a fresh Jupyter kernel started and stopped, and
loading the study's base model (from the folder's cache). The fixed cost per node is their sum; its
share of all node time is what one process per worker reused across nodes could save at most.

Usage: python benchmarks/node_times.py runs/<profile> [--measure] [--repeat 3]
Prints one table per part and last a line ``fixed_cost_per_node=<s> s (<pct> % of node time)``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpbias_utils import paths  # noqa: E402

FIRST_CELL_IMPORTS = "import torch, transformers, pandas; import dpbias_utils.plots, dpbias_utils.stages.s04_bias"


def worker_imports(profile_dir: Path) -> list[float]:
    """Seconds each node worker spent importing before its first node (from `.workers.log`)."""
    log = profile_dir / paths.WORKER_LOG
    if not log.is_file():
        return []
    found = re.findall(r"imported \d+ modules in ([0-9.]+) s", log.read_text(errors="replace"))
    return [float(x) for x in found]


def _t(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def node_records(profile_dir: Path) -> list[dict]:
    """One dict per complete node: stage, id, seconds, finished (epoch s) and the notebook split."""
    out = []
    for stage, sub in paths.STAGE_DIRS.items():
        for folder in sorted((profile_dir / sub).glob("*")):
            try:
                marker = json.loads((folder / paths.MARKER).read_text())
            except (OSError, ValueError):
                continue
            rec = {"stage": stage, "node": folder.name, "seconds": float(marker["seconds"]),
                   "finished": datetime.strptime(marker["finished"], "%Y-%m-%dT%H:%M:%S").timestamp()}
            rec.update(notebook_split(folder / "notebook.ipynb", rec["seconds"]))
            out.append(rec)
    return out


def notebook_split(nb_path: Path, seconds: float) -> dict:
    """kernel / imports / work / other seconds of one executed notebook (empty when unreadable)."""
    try:
        nb = json.loads(nb_path.read_text())
        pm = nb["metadata"]["papermill"]
        cells = [c["metadata"]["papermill"] for c in nb["cells"]
                 if c.get("cell_type") == "code" and c["metadata"].get("papermill", {}).get("start_time")]
        start, first = _t(pm["start_time"]), cells[0]
        return {"kernel": _t(first["start_time"]) - start, "imports": float(first["duration"]),
                "work": sum(float(c["duration"] or 0) for c in cells[1:]),
                "other": seconds - float(pm["duration"])}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def stage_table(recs: list[dict]) -> list[dict]:
    by = defaultdict(list)
    for r in recs:
        by[r["stage"]].append(r)
    rows = []
    for stage in sorted(by):
        rs = by[stage]
        s = [r["seconds"] for r in rs]
        row = {"stage": stage, "nodes": len(rs), "node_s": sum(s), "mean_s": statistics.mean(s), "max_s": max(s)}
        for part in ("kernel", "imports", "work", "other"):
            vals = [r[part] for r in rs if part in r]
            row[part] = statistics.mean(vals) if vals else float("nan")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- measured fixed costs
def _min_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_imports(repeat: int) -> float:
    """A fresh interpreter importing what a node's first cell imports, minus a bare interpreter."""
    bare = _min_time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), repeat)
    full = _min_time(lambda: subprocess.run([sys.executable, "-c", FIRST_CELL_IMPORTS], check=True), repeat)
    return full - bare


def measure_node_process_imports(repeat: int) -> tuple[float, float]:
    """A node process's `import papermill` (and nbconvert, for the report), as a node imports it (without
    jsonschema's optional iri checker, `node.skip_iri_format_checker`) and with it, minus a bare interpreter."""
    bare = _min_time(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), repeat)
    code = "import papermill, nbconvert"
    skip = "from dpbias_utils.pipeline.node import skip_iri_format_checker; skip_iri_format_checker(); "
    as_node = _min_time(lambda: subprocess.run([sys.executable, "-c", skip + code], check=True), repeat)
    plain = _min_time(lambda: subprocess.run([sys.executable, "-c", code], check=True), repeat)
    return as_node - bare, plain - bare


def measure_kernel(repeat: int) -> float:
    """Start a python3 Jupyter kernel, wait until it answers, shut it down (what papermill does per node)."""
    from jupyter_client.manager import start_new_kernel

    def once():
        km, kc = start_new_kernel(kernel_name="python3")
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return _min_time(once, repeat)


def measure_model_load(profile_dir: Path, repeat: int) -> float | None:
    """basemodel.load_base on the study's cached base model (None when the folder has none)."""
    cache = profile_dir.parent / "_cache"
    bases = sorted(p.parent for p in cache.rglob("config.json")) if cache.is_dir() else []
    if not bases:
        return None
    from dpbias_utils.basemodel import load_base

    load_base(str(bases[0]), device="cpu")  # first load pays the imports
    return _min_time(lambda: load_base(str(bases[0]), device="cpu"), repeat)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile_dir", type=Path, help="a finished profile folder, runs/<profile>")
    ap.add_argument("--measure", action="store_true", help="also measure imports, kernel start and model load here")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    recs = node_records(args.profile_dir)
    if not recs:
        sys.exit(f"{args.profile_dir}: no complete node (no {paths.MARKER} under its stage folders)")
    rows = stage_table(recs)
    total = sum(r["seconds"] for r in recs)
    span = max(r["finished"] for r in recs) - min(r["finished"] - r["seconds"] for r in recs)
    print(f"{args.profile_dir}: {len(recs)} nodes, {total:.0f} node-seconds, span {span:.0f} s "
          f"(first node start to last node end)")
    print(f"{'stage':5s} {'nodes':>5s} {'node-s':>8s} {'share':>6s} {'mean':>7s} {'max':>7s} | mean split: "
          f"{'kernel':>7s} {'imports':>7s} {'work':>7s} {'other':>7s}")
    for r in rows:
        print(f"{r['stage']:5s} {r['nodes']:5d} {r['node_s']:8.1f} {r['node_s'] / total:6.1%} {r['mean_s']:7.1f} "
              f"{r['max_s']:7.1f} |             {r['kernel']:7.1f} {r['imports']:7.1f} {r['work']:7.1f} {r['other']:7.1f}")
    split = {p: statistics.mean([r[p] for r in recs if p in r] or [float("nan")])
             for p in ("kernel", "imports", "work", "other")}
    print(f"all   {len(recs):5d} {total:8.1f} {1:6.1%} {total / len(recs):7.1f} {max(r['seconds'] for r in recs):7.1f} |"
          f"             {split['kernel']:7.1f} {split['imports']:7.1f} {split['work']:7.1f} {split['other']:7.1f}")
    result = {"nodes": len(recs), "node_seconds": total, "span": span, "stages": rows, "split": split}
    fixed_logged = split["kernel"] + split["imports"] + split["other"]
    print(f"fixed cost from the notebooks: kernel {split['kernel']:.1f} s + imports {split['imports']:.1f} s "
          f"+ other (papermill import, HTML) {split['other']:.1f} s per node (model loads are inside 'work')")
    workers = worker_imports(args.profile_dir)
    if workers:
        print(f"node workers: {len(workers)} started, each imported once in {statistics.mean(workers):.1f} s on average "
              f"({sum(workers):.0f} s in all, not in the node-seconds above)")
    result["worker_imports"] = workers
    if args.measure:
        node_imp, node_imp_iri = measure_node_process_imports(args.repeat)
        imp = measure_imports(args.repeat)
        ker = measure_kernel(args.repeat)
        load = measure_model_load(args.profile_dir, args.repeat)
        print(f"measured here (min of {args.repeat}): node process imports papermill+nbconvert {node_imp:.2f} s "
              f"(with jsonschema's iri checker {node_imp_iri:.2f} s), kernel start+stop {ker:.2f} s, "
              f"first-cell imports {imp:.2f} s, base model load {'n/a' if load is None else f'{load:.2f} s'}")
        fixed = node_imp + imp + ker + (load or 0.0)
        result.update(measured={"node_process_imports": node_imp, "node_process_imports_with_iri": node_imp_iri,
                                "imports": imp, "kernel": ker, "model_load": load})
    else:
        fixed = fixed_logged
    result["fixed_cost_per_node"] = fixed
    print(f"fixed_cost_per_node={fixed:.1f} s ({fixed * len(recs) / total:.0%} of node time)")
    return result


if __name__ == "__main__":
    main()
