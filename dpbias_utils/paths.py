"""Every path the project uses, in one place, and how the project writes into them."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
PARAMS = REPO_ROOT / "params"
FIGURES = REPO_ROOT / "figures"
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
DEFAULT_PARAMS = PARAMS / "default.yaml"
# The notebooks' Jupyter kernel: `make setup` registers it for .venv; the notebooks' metadata and the
# runner (`kernel_name`) name it.
KERNEL = "dp-bias"
# Generated output; overridable so tests and clusters can put it elsewhere (`runs_root()` reads the
# environment at call time; RUNS is its value at import).
RUNS = Path(os.environ.get("DPBIAS_RUNS") or REPO_ROOT / "runs")
# The files of a node folder the pipeline and the stages share (see docs/architecture.md).
MARKER = "_COMPLETE.json"  # a node is complete when this file (written last) exists in its folder
NODE_SPEC = "node.json"  # what the runner injects into the notebook (stage, notebook, parameters)
NODE_LOG = "runner.log"  # the node process's stdout and stderr
WORKER_LOG = ".workers.log"  # in the profile folder: the local runner's node workers' own stderr (imports, a crash)
CONTEXT_FILE = "context.json"  # the node's stage, profile, point and run id (stage 05 labels outputs by it)
LOCK = ".lock"  # fcntl lock: held exclusively while the node runs, shared while downstream nodes read it
PROGRESS = ".progress.json"  # the node's progress bars, for the runner's console (progress.tqdm)
# Real data files for tests (never copied into the project; the project runs without them).
SHARED_DATA = Path(os.environ.get("DPBIAS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

STAGE_NOTEBOOKS = {
    "01": "01_data_cda.ipynb",
    "02": "02_training.ipynb",
    "03": "03_gradient_norms.ipynb",
    "04": "04_bias_evaluation.ipynb",
    "05": "05_figures.ipynb",
}
STAGE_DIRS = {"01": "01_data", "02": "02_train", "03": "03_gradnorms", "04": "04_bias", "05": "05_report"}


# One rule, shared by the profile checks and every loader, for "is this value a local path or a hub id".
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".ckpt", ".pt")


def resolve_path(value: str) -> Path:
    """A profile's path: relative to the repository root unless absolute (`~` expanded)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def looks_like_path(value: str) -> bool:
    """True when `value` names a local file or folder rather than a hub id (``namespace/name``): it
    starts with '.', '/' or '~', ends in a file suffix (`LOCAL_SUFFIXES`), has more than one '/' or a
    backslash, or exists (relative to the repository root)."""
    value = str(value)
    return (value.startswith((".", "/", "~")) or value.lower().endswith(LOCAL_SUFFIXES) or value.count("/") > 1
            or "\\" in value or (bool(value) and resolve_path(value).exists()))


# CrowS-Pairs (Nangia et al. 2020): the official CSV, pinned to a commit of nyu-mll/crows-pairs and
# checked by its sha256 (the hub's `nyu-mll/crows_pairs` is a loading-script dataset, which datasets
# >= 4 refuses).
CROWS_PAIRS_COMMIT = "8aaac11c485473159ec9328a65253a5be9a479dc"
CROWS_PAIRS_URL = (f"https://raw.githubusercontent.com/nyu-mll/crows-pairs/{CROWS_PAIRS_COMMIT}/"
                   "data/crows_pairs_anonymized.csv")
CROWS_PAIRS_SHA256 = "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c"


def asset_cache() -> Path:
    """Downloaded files that are not on the hub (the pinned CrowS-Pairs CSV): $DPBIAS_ASSETS, else
    `dpbias/` under the Hugging Face cache home ($HF_HOME, else ~/.cache/huggingface)."""
    env = os.environ.get("DPBIAS_ASSETS")
    if env:
        return Path(env)
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "dpbias"


def runs_root() -> Path:
    """The output root: $DPBIAS_RUNS, else `runs/` in the repository. The runner sets DPBIAS_RUNS for
    every node it executes to its `--runs-dir`, so the notebooks and their caches follow it."""
    return Path(os.environ.get("DPBIAS_RUNS") or REPO_ROOT / "runs")


def cache_dir(runs: Path | None = None) -> Path:
    """Cache shared by all profiles (the built-in base models, noise calibrations): $DPBIAS_CACHE,
    else `_cache/` under the output root (`runs`, else `runs_root()`)."""
    env = os.environ.get("DPBIAS_CACHE")
    return Path(env) if env else Path(runs or runs_root()) / "_cache"


def profile_dir(profile: str, runs: Path | None = None) -> Path:
    return Path(runs or runs_root()) / profile


def stage_dir(profile: str, stage: str, runs: Path | None = None) -> Path:
    return profile_dir(profile, runs) / STAGE_DIRS[stage]


def shared(*parts: str) -> Path:
    return SHARED_DATA.joinpath(*parts)


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder in `parent`, to be renamed into place, with the mode of an ordinary
    `mkdir` (0777 minus the umask), not mkdtemp's 0700: what is renamed into a shared runs folder
    stays readable by the group the umask allows."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def default_modes(folder: Path) -> None:
    """Give `folder`, and everything in it, the modes of ordinary files and folders under the umask
    (libraries that write through private temporary files leave 0600 behind)."""
    mask = _umask()
    Path(folder).chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


class RunsDirError(RuntimeError):
    """The output folder cannot be written (read-only, not permitted, or full)."""


_UNWRITABLE = {errno.EACCES: "not writable", errno.EPERM: "not writable", errno.EROFS: "on a read-only file system",
               errno.ENOSPC: "full", errno.EDQUOT: "full (disk quota exceeded)"}
MIN_FREE_BYTES = 16 * 2**20  # below this a study cannot write one node's notebook and outputs


def unwritable_error(exc: OSError, folder: Path) -> RunsDirError | None:
    """The one-line error for an OSError that means `folder` cannot be written, else None."""
    why = _UNWRITABLE.get(exc.errno)
    if why is None:
        return None
    where = exc.filename or folder
    return RunsDirError(f"runs folder {folder} is {why} ({where}: {exc.strerror}); choose another with "
                        "--runs-dir or DPBIAS_RUNS")


def check_writable(folder: Path) -> None:
    """Create `folder` and write a probe file in it; raise RunsDirError naming it when that fails or
    when its file system has less than MIN_FREE_BYTES free."""
    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:  # any failure here (also a missing parent on /proc, a file in the path) stops the run
        raise (unwritable_error(exc, folder) or RunsDirError(
            f"runs folder {folder} cannot be created or written ({exc.filename or folder}: {exc.strerror}); "
            "choose another with --runs-dir or DPBIAS_RUNS")) from exc
    if free < MIN_FREE_BYTES:
        raise RunsDirError(f"runs folder {folder} is full ({free / 2**20:.1f} MiB free, a node needs at least "
                           f"{MIN_FREE_BYTES // 2**20} MiB); free space or choose another with --runs-dir or DPBIAS_RUNS")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def kernel_name() -> str:
    """The kernel papermill runs the stage notebooks in: `KERNEL` when registered (`make setup`), else
    ipykernel's own `python3` (this interpreter), e.g. in an environment set up without the Makefile."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        return "python3"
    return KERNEL


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
