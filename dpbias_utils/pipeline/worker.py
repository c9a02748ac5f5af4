"""A node worker: one long-lived process per parallel slot of the local runner, which imports what
every node imports once and runs each node in a fresh child forked from itself.

Why: a node used to be a new Python process that imported papermill, which started a Jupyter kernel,
which imported torch, transformers, pandas and the package; on 2 cores that fixed cost was a fifth
of the default study (`benchmarks/node_times.py`). A forked child starts with all of it imported,
runs its notebook in its own process (`pipeline.inprocess`, papermill's engine without a kernel) and
exits, so nodes still share nothing: each has its own memory, random state and working directory,
and a crash or an out-of-memory kill takes one node, not the worker.

What a child does differently from a fresh process, and why it does not change a node:
* numpy's global random state is re-seeded from the OS (a fresh process seeds it so; Python's
  `random` re-seeds itself after a fork; torch's default generator is untouched by the worker);
* when the package's files on disk no longer hash to what the worker imported (code edited during a
  study), the child replaces itself with a fresh `python -m dpbias_utils.pipeline.node` process, so a
  node's recorded source hash is always that of the code that computed it; so does a child of a
  worker that initialised CUDA while importing (CUDA does not survive a fork).

Protocol (`pipeline.run` is the only caller): one node spec path per line on stdin; one line back
per node, its exit status (`node.execute_node`'s). End of stdin ends the worker. The worker ignores
SIGINT; the runner interrupts a study by signalling the worker's process group, which its running
child is in (KeyboardInterrupt there: the node fails, nothing is marked complete).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

from .. import allocator, paths

# Imported once per worker: what the stage notebooks and the stages import, measured (a node's
# `sys.modules` after it ran, against the worker's): transformers imports a model's classes lazily, and
# GPT-2's modelling module brings torch._dynamo with it (seconds per node on 2 cores); the toxicity and
# sentiment scorers, opacus, datasets and seaborn are imported inside stage functions. Nothing here
# starts a thread (a fork copies only the calling thread).
PRELOAD = ("numpy", "pandas", "pyarrow.parquet", "torch", "transformers", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.auto.modeling_auto", "opacus", "datasets", "profanity_check",
           "vaderSentiment.vaderSentiment", "matplotlib.pyplot", "seaborn", "papermill", "nbconvert", "IPython",
           "dpbias_utils.basemodel", "dpbias_utils.plots", "dpbias_utils.training", "dpbias_utils.gradnorms",
           "dpbias_utils.bias.evaluate", "dpbias_utils.results", "dpbias_utils.stages.s01_data",
           "dpbias_utils.stages.s02_training", "dpbias_utils.stages.s03_gradnorms", "dpbias_utils.stages.s04_bias",
           "dpbias_utils.stages.s05_results")


# Set, it replaces `PRELOAD` by the modules it names (comma-separated; empty: none). For a runner whose
# notebooks import none of them: the runner's own tests run stand-in notebooks (tests/pipeline), where
# importing torch and transformers into every worker was most of each run's time. A node imports what
# it needs either way: only when it pays for its imports changes, not what it computes.
PRELOAD_ENV = "DPBIAS_WORKER_PRELOAD"


def preload_modules() -> tuple[str, ...]:
    """`PRELOAD`, or the modules `PRELOAD_ENV` names."""
    names = os.environ.get(PRELOAD_ENV)
    return PRELOAD if names is None else tuple(n.strip() for n in names.split(",") if n.strip())


def preload() -> str:
    """Import `preload_modules()`, build the HTML exporter once, register the in-process engine; returns
    the package hash of the code imported (`provenance.package_hash`)."""
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    from . import node as node_exec

    node_exec.skip_iri_format_checker()
    for name in preload_modules():
        try:
            importlib.import_module(name)
        except ImportError:  # an optional scorer not installed: the node that needs it says so
            pass
    from . import inprocess, provenance

    inprocess.register()
    node_exec.html_exporter()  # templates and their Jinja environment, compiled once
    return provenance.package_hash()


def _child(spec_path: str, imported_hash: str) -> int:
    """In the forked child: run the node (or hand it to a fresh process when the code changed)."""
    import numpy as np

    from . import node as node_exec
    from . import provenance

    signal.signal(signal.SIGINT, signal.default_int_handler)
    np.random.seed()  # numpy's global state from the OS, as in a fresh process
    provenance.package_hash.cache_clear()
    provenance.git_state.cache_clear()
    if provenance.package_hash() != imported_hash or _cuda_unusable_after_fork():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "dpbias_utils.pipeline.node", spec_path])
    return node_exec.execute_node(Path(spec_path))


def _cuda_unusable_after_fork() -> bool:
    """True when the worker initialised CUDA before forking (an import that probed the GPU): CUDA cannot
    be used in a forked child then, so the node needs a fresh process. A worker that never imported
    torch cannot have initialised CUDA (and the child need not import torch to know it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    bad = getattr(torch.cuda, "_is_in_bad_fork", None)
    return bool(bad()) if bad is not None else torch.cuda.is_initialized()


def run_forked(spec_path: str, imported_hash: str) -> int:
    """Fork a child that runs the node with its stdout and stderr appended to the node's log; wait."""
    log_path = Path(spec_path).with_name(paths.NODE_LOG)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # whatever the worker's sys.stdout was
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            rc = _child(spec_path, imported_hash)
        except BaseException:  # noqa: BLE001 - whatever happens, the child ends here with a status
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed while importing goes to the worker's log, never into the replies
    started = time.time()
    allocator.tune()  # before the imports; the forked node children inherit it
    imported_hash = preload()
    print(f"worker {os.getpid()}: imported {len(preload_modules())} modules in {time.time() - started:.1f} s "
          f"(package {imported_hash})", file=sys.stderr, flush=True)  # benchmarks/node_times.py reads it
    replies.write("ready\n")
    for line in sys.stdin:
        spec = line.strip()
        if spec:
            replies.write(f"{run_forked(spec, imported_hash)}\n")
    return 0


if __name__ == "__main__":  # python -m dpbias_utils.pipeline.worker (started by pipeline.run)
    sys.exit(main())
