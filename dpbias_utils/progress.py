"""Progress of a running node, for the runner's console rather than the notebook.

`dpbias run` executes each node with `DPBIAS_PROGRESS_FILE` set to `<node folder>/.progress.json`.
There the `tqdm` of this module draws nothing into the notebook: it writes its state (every open
bar, outermost first: description, step, total, rate) to that file at most once a second, and one
summary line on stderr when a top-level bar with `leave=True` (tqdm's default) closes. The runner
reads the file and prints a line per running node every few seconds. Without the variable
(JupyterLab, papermill by hand) it is plain tqdm. The runner also sets TQDM_DISABLE for the kernel,
so the bars of libraries (datasets, transformers' "Loading weights") stay out of the notebook;
these bars pass `disable=False`.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm as _tqdm

ENV = "DPBIAS_PROGRESS_FILE"
WRITE_EVERY_S = 1.0
_open: list["tqdm"] = []  # the bars of this process that report to the file, outermost first
_last: dict = {}  # the last top-level bar closed ("last" in the file)


def _is_open(bar: "tqdm") -> bool:  # by identity: tqdm compares bars by screen position
    return any(b is bar for b in _open)


def read(path: Path) -> dict | None:
    """The state a node last wrote ({"bars": [...], "updated": unix time}), or None."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _state(bar: "tqdm") -> dict:
    rate = bar.format_dict.get("rate")
    if rate is None and bar.n:
        rate = bar.n / max(1e-9, time.time() - bar.start_t)
    return {"desc": bar.desc or "", "n": bar.n, "total": bar.total, "unit": bar.unit, "rate": rate,
            "elapsed": round(time.time() - bar.start_t, 1)}


def _write(path: str) -> None:
    from .paths import atomic_write_text

    try:
        atomic_write_text(Path(path), json.dumps({"bars": [_state(b) for b in _open], "last": _last,
                                                  "updated": time.time(), "pid": os.getpid()}))
    except OSError:
        pass  # progress is a courtesy: never fail a node over it


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.tqdm
    """tqdm that reports to the runner's progress file when one is set (see the module doc)."""

    def __init__(self, *args, **kwargs):
        self._progress_file = os.environ.get(ENV)
        if self._progress_file and not kwargs.get("disable"):  # explicit: TQDM_DISABLE (set for libraries) is a default
            kwargs.update(file=io.StringIO(), mininterval=WRITE_EVERY_S, disable=False)
        super().__init__(*args, **kwargs)
        if self._progress_file and not self.disable:
            _open.append(self)
            _write(self._progress_file)

    def display(self, msg=None, pos=None):
        if not (self._progress_file and _is_open(self)):
            return super().display(msg, pos)
        _write(self._progress_file)
        return True

    def close(self):
        if getattr(self, "_progress_file", None) and _is_open(self):
            top = _open[0] is self
            _open[:] = [b for b in _open if b is not self]
            if top:
                _last.clear()
                _last.update(_state(self))
            _write(self._progress_file)
            if top and self.leave and self.total:
                rate = _state(self)["rate"]
                print(f"{self.desc}: {self.n}/{self.total} {self.unit} in {time.time() - self.start_t:.0f} s"
                      + (f" ({rate:.3g} {self.unit}/s)" if rate else ""), file=sys.stderr, flush=True)
        super().close()
