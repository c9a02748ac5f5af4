"""A papermill engine that runs a notebook's cells in the calling Python process (`ENGINE`).

papermill's own engine starts a Jupyter kernel per notebook: a second Python process that imports
torch, transformers and the package again (a node process already imported papermill). Here the
cells run in an IPython `InteractiveShell` of the node's own process, and what a kernel would have
sent back is recorded as the same nbformat outputs:

* ``stream`` (stdout, stderr: `sys.stdout` / `sys.stderr` while a cell runs; consecutive writes merged),
* ``display_data`` (`display(...)`, through the shell's display publisher),
* ``execute_result`` (a cell's last expression, through the shell's display hook, with every mime type
  the object's ``_repr_*_`` methods give),
* ``error`` (name, value and the coloured traceback, as a kernel's ``error`` message carries them).

papermill does everything else as for a kernel: parameters injected after the ``parameters`` cell,
its metadata (per-cell times, ``exception``), the saved partial notebook and `PapermillExecutionError`
after a failing cell. So a node's ``notebook.ipynb`` reads as before; what differs is the process.

Limits, by design of the stage notebooks (one call per cell, figures returned as objects): no magics
beyond IPython's, no widgets, matplotlib's non-interactive ``Agg`` backend (a figure is shown by
returning it or ``display``-ing it, not by ``plt.show()``), and no isolation between notebooks run in
one process: run one notebook per process (`pipeline.worker` forks a fresh child for each node).
"""
from __future__ import annotations

import io
import os
import sys
from typing import Optional

ENGINE = "dpbias-inprocess"


class _Outputs(list):
    """A cell's outputs in nbformat order; stream writes to the same stream are merged."""

    def stream(self, name: str, text: str) -> None:
        from nbformat.v4 import new_output

        if self and self[-1].get("output_type") == "stream" and self[-1].get("name") == name:
            self[-1]["text"] += text
        else:
            self.append(new_output("stream", name=name, text=text))


class _Stream(io.TextIOBase):
    """`sys.stdout` / `sys.stderr` of a running cell."""

    def __init__(self, name: str, outputs: "_Outputs", real):
        self.name, self.outputs, self.real = name, outputs, real

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self.outputs.stream(self.name, text)
        return len(text)

    def fileno(self) -> int:  # C-level writers (faulthandler, subprocess) get the process's own file
        return self.real.fileno()

    @property
    def encoding(self) -> str:
        return "utf-8"


def _shell_classes():
    """The shell, display hook and publisher classes (IPython is imported only when a notebook runs)."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from nbformat.v4 import new_output

    class Hook(DisplayHook):
        """A cell's last value -> an ``execute_result`` (what ipykernel's display hook sends)."""

        def start_displayhook(self):
            pass

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            self.shell.cell_outputs.append(new_output("execute_result", data=format_dict, metadata=md_dict or {},
                                                      execution_count=self.shell.execution_count))

        def finish_displayhook(self):
            pass

    class Publisher(DisplayPublisher):
        """``display(...)`` -> a ``display_data`` output."""

        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            self.shell.cell_outputs.append(new_output("display_data", data=data, metadata=metadata or {}))

        def clear_output(self, wait=False):
            self.shell.cell_outputs.clear()

    class Shell(InteractiveShell):
        """IPython's shell with a kernel's output channels: everything goes to `cell_outputs`."""

        cell_outputs: _Outputs = _Outputs()

        def init_displayhook(self):
            self.displayhook = Hook(shell=self, cache_size=self.cache_size)
            self.configurables.append(self.displayhook)
            self.display_trap = _display_trap(self.displayhook)

        def init_display_pub(self):
            self.display_pub = Publisher(shell=self, parent=self)
            self.configurables.append(self.display_pub)

        def _showtraceback(self, etype, evalue, stb):
            self.cell_outputs.append(new_output("error", ename=getattr(etype, "__name__", str(etype)),
                                                evalue=str(evalue), traceback=list(stb)))

    return Shell


def _display_trap(hook):
    from IPython.core.display_trap import DisplayTrap

    return DisplayTrap(hook=hook)


_SHELL = None


def shell():
    """This process's one shell (created on first use; no history file, no ~/.ipython writes)."""
    global _SHELL
    if _SHELL is None:
        from traitlets.config import Config

        cfg = Config()
        cfg.HistoryManager.enabled = False
        cfg.InteractiveShell.colors = "nocolor"
        cfg.InteractiveShell.xmode = "Context"
        _SHELL = _shell_classes().instance(config=cfg)
    return _SHELL


def run_cell(source: str) -> tuple[list, int, bool]:
    """Run one code cell in the shell: (its nbformat outputs, its execution count, ok)."""
    sh = shell()
    outputs = _Outputs()
    sh.cell_outputs = outputs
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stream("stdout", outputs, saved[0]), _Stream("stderr", outputs, saved[1])
    try:
        result = sh.run_cell(source, store_history=True)
    finally:
        sys.stdout, sys.stderr = saved
    ok = result.error_before_exec is None and result.error_in_exec is None
    for out in outputs:
        if out.get("output_type") == "execute_result":
            out["execution_count"] = result.execution_count
    return list(outputs), result.execution_count, ok


def _engine_class():
    from papermill.engines import Engine

    class InProcessEngine(Engine):
        """papermill engine `ENGINE`: the cells run in this process (`run_cell`), stopping at the first error."""

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            os.environ.setdefault("MPLBACKEND", "Agg")
            cwd: Optional[str] = kwargs.get("cwd")
            before = os.getcwd()
            if cwd:
                os.chdir(cwd)
            try:
                for index, cell in enumerate(nb_man.nb.cells):
                    nb_man.cell_start(cell, index)
                    try:
                        if cell.cell_type == "code":
                            cell.outputs, cell.execution_count, ok = run_cell(cell.source)
                            if not ok:
                                nb_man.cell_exception(cell, cell_index=index)
                                break
                    finally:
                        nb_man.cell_complete(cell, cell_index=index)
            finally:
                os.chdir(before)

    return InProcessEngine


def register() -> str:
    """Register `ENGINE` with papermill (idempotent); returns its name for `execute_notebook(engine_name=...)`."""
    from papermill.engines import papermill_engines

    if ENGINE not in papermill_engines._engines:
        papermill_engines.register(ENGINE, _engine_class())
    return ENGINE
