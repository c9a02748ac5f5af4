"""`runs/<profile>/index.html`: the page a reader opens. Findings first (written by stage 05 as
`findings.html`), then a link to every rendered stage notebook with its status."""
from __future__ import annotations

import html
import os
from pathlib import Path

from . import paths

FINDINGS = "findings.html"

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
.done{color:#176317}.failed{color:#a31515}.todo{color:#777} img{max-width:100%} code{background:#f4f4f4;padding:0 .2em}
"""


def _status(folder: Path) -> str:
    from .runner import MARKER

    if (folder / MARKER).is_file():
        return "done"
    if (folder / "notebook.ipynb").is_file():
        return "failed"
    return "todo"


def write_index(profile, nodes, profile_dir: Path) -> Path:
    """(Re)write the index page; cheap, called after every runner invocation."""
    profile_dir = Path(profile_dir)
    profile_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dp-bias: {html.escape(profile.name)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>dp-bias study: <code>{html.escape(profile.name)}</code></h1>",
             f"<p>{html.escape(profile.description)}</p>"]
    findings = profile_dir / FINDINGS
    if findings.is_file():
        parts.append(findings.read_text(encoding="utf-8"))
    else:
        parts.append("<p><em>No findings yet: stage 05 has not completed.</em></p>")
    parts.append("<h2>Stage reports</h2>")
    for stage, nb in paths.STAGE_NOTEBOOKS.items():
        group = [n for n in nodes if n.stage == stage]
        if not group:
            continue
        parts.append(f"<h3>Stage {stage}: <code>{nb}</code></h3><table><tr><th>node</th><th>status</th><th>report</th></tr>")
        for n in group:
            folder = n.folder(profile_dir)
            status = _status(folder)
            rel = os.path.relpath(folder / "report.html", profile_dir)
            link = f"<a href='{html.escape(rel)}'>report</a>" if (folder / "report.html").is_file() else ""
            parts.append(f"<tr><td><code>{html.escape(n.node_id)}</code></td><td class='{status}'>{status}</td><td>{link}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out = profile_dir / "index.html"
    paths.atomic_write_text(out, "\n".join(parts))
    return out

