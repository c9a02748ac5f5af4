"""What a run leaves on disk while it trains: RNG state, atomic checkpoints, resume, steps.csv, DONE.json.

A checkpoint (`checkpoints/last.pt`) holds the run's configuration, the step, the rows of steps.csv so
far, the stepper's state (model, optimizer, accountant, sampling and noise generators) and the global
RNG state; resuming from it continues bit-exactly (CPU), in both noise modes. A finished run
(`DONE.json`) is never retrained, and is never handed back for different settings.

checkpoints/ is private material, as secret as the training data: the generator states in it
determine every later Poisson batch and noise vector (and, mt19937 being invertible, the earlier
ones), and the rows carry steps.csv's statistics of the private batches, which epsilon does not
cover. A secret-mode run's privacy holds only if checkpoints/ is deleted
or kept secret; it is never part of a release.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import seeds
from ..paths import atomic_write_text
from .batching import TrainingError

DONE_FILE = "DONE.json"
STEPS_COLUMNS = ["step", "epoch", "loss", "epsilon_spent", "clip_fraction", "grad_norm_q10", "grad_norm_q50",
                 "grad_norm_q90", "lr", "n_units_in_batch"]
# Columns of steps.csv computed from the private batches without noise: epsilon does not cover them
# (diagnostics only; not for release). The others are public: the plan's schedule and the accountant.
PRIVATE_STATISTICS = ("loss", "clip_fraction", "grad_norm_q10", "grad_norm_q50", "grad_norm_q90", "n_units_in_batch")


# --------------------------------------------------------------------------- files
def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def json_normalised(obj):
    """`obj` as it reads back from a JSON file written by `write_json`."""
    return json.loads(json.dumps(obj, default=_json_default))


def write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_steps_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=STEPS_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k])
                    for k in STEPS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def token_bytes(ids) -> bytes:
    """A row's identity: its token ids as int64 bytes (what is trained on, whatever its text column says)."""
    return np.asarray(ids, dtype=np.int64).tobytes()


def frame_fingerprint(df) -> str:
    h = hashlib.sha256()
    for uid, ids in zip(df["unit_id"], df["input_ids"]):
        h.update(np.int64(uid).tobytes())
        h.update(token_bytes(ids))
    return h.hexdigest()[:16]


def finished_run(out_dir: Path, request: dict) -> dict | None:
    """The recorded result of a finished run in `out_dir` (None if unfinished); refuses other settings."""
    done = out_dir / DONE_FILE
    if not done.is_file():
        return None
    recorded = json.loads(done.read_text())
    if recorded.get("request") != json_normalised(request):
        raise TrainingError(f"{out_dir} holds a finished run with different settings "
                            f"({recorded.get('request')}); use another out_dir")
    return recorded


# --------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy's global and torch's global generators (model init, dropout) from the run
    seed's `init` stream (`seeds`), independent of its sampling and noise streams."""
    s = seeds.int_seed(seed, "init")
    random.seed(s)
    np.random.seed(seeds.sequence(seed, "init").generate_state(4))
    torch.manual_seed(s)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """`out_dir/checkpoints/last.pt` of one configuration, and steps.csv beside it."""

    def __init__(self, out_dir: Path, config: dict, name: str = "last.pt", steps_csv: bool = True):
        (out_dir / "checkpoints").mkdir(exist_ok=True)
        self.path = out_dir / "checkpoints" / name
        self.steps_csv = out_dir / "steps.csv" if steps_csv else None
        self.config = config

    def resume(self, stepper) -> tuple[int, list[dict], int | None]:
        """Load the last checkpoint into `stepper` and the global RNG: (step, rows, resumed_from)."""
        if not self.path.is_file():
            return 0, [], None
        ck = torch.load(self.path, map_location="cpu", weights_only=False)
        if ck["config"] != self.config:
            raise TrainingError(f"checkpoint {self.path} belongs to a different configuration; delete it to restart")
        stepper.load_state_dict(ck)
        set_rng_state(ck["rng"])
        return int(ck["step"]), list(ck["rows"]), int(ck["step"])

    def save(self, step: int, rows: list[dict], stepper) -> None:
        atomic_torch_save({"config": self.config, "step": step, "rows": rows, **stepper.state_dict(),
                           "rng": rng_state()}, self.path)
        if self.steps_csv is not None:
            write_steps_csv(rows, self.steps_csv)


# --------------------------------------------------------------------------- steps.csv rows
def _quantiles(x: torch.Tensor) -> tuple[float, float, float]:
    if x.numel() == 0:
        return (math.nan, math.nan, math.nan)
    q = torch.quantile(x.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double))
    return tuple(float(v) for v in q)


class StepLog:
    """The rows of steps.csv: per optimizer step, the mean unit loss, the clipping statistics of the
    units' gradient norms (DP), the units in the logical batch and, where evaluated, epsilon spent.
    `reduce` (distributed training) sums a float64 tensor over the processes: the loss and the units
    counted are then the logical batch's over every process (the norm statistics stay this process's)."""

    def __init__(self, rows: list[dict], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.rows, self.reduce = rows, reduce
        self._losses, self._norms, self._n_units = [], [], 0

    def add(self, n_units: int, losses: torch.Tensor, norms: torch.Tensor | None) -> None:
        """One physical batch's per-unit losses and (DP) gradient norms."""
        self._n_units += n_units
        self._losses.append(losses.float().cpu())
        if norms is not None:
            self._norms.append(norms)

    def close_step(self, step: int, epoch: float, epsilon, lr: float, max_grad_norm: float | None) -> dict:
        """Append the row of the logical batch just stepped; `max_grad_norm` None for non-DP."""
        losses = torch.cat(self._losses) if self._losses else torch.zeros(0)
        norms = torch.cat(self._norms) if self._norms else torch.zeros(0)
        q10, q50, q90 = _quantiles(norms)
        clipped = max_grad_norm is not None and norms.numel()
        loss = float(losses.mean()) if losses.numel() else math.nan
        if self.reduce is not None:
            total = self.reduce(torch.tensor([float(losses.sum()), self._n_units], dtype=torch.float64))
            self._n_units = int(total[1])
            loss = float(total[0]) / self._n_units if self._n_units else math.nan  # as one process: NaN if empty
        self.rows.append({
            "step": step, "epoch": epoch, "loss": loss,
            "epsilon_spent": epsilon,
            "clip_fraction": float((norms > max_grad_norm).double().mean()) if clipped else math.nan,
            "grad_norm_q10": q10, "grad_norm_q50": q50, "grad_norm_q90": q90, "lr": lr,
            "n_units_in_batch": self._n_units})
        self._losses, self._norms, self._n_units = [], [], 0
        return self.rows[-1]
