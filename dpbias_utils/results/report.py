"""`runs/<profile>/index.html`: the page a reader opens, a short paper. The question; the methods
(from the profile and the privacy table); the findings written by stage 05 as `findings.html`
(verdicts with intervals, figures with captions, privacy spent); the code version; then a link to
every rendered stage notebook with its condition and status."""
from __future__ import annotations

import html
import os
from pathlib import Path

from .. import paths
from ..seeds import RELEASE

FINDINGS = "findings.html"

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
.done{color:#176317}.failed{color:#a31515}.todo{color:#777} img{max-width:100%} code{background:#f4f4f4;padding:0 .2em}
.sub{color:#555;margin-top:0} table.kv th{width:9em;vertical-align:top;background:#fafafa} th{background:#f4f4f4}
figure{margin:1.5em 0} figcaption{font-size:.92em;color:#333;max-width:60em} td{vertical-align:top}
"""


def _status(folder: Path) -> str:
    if (folder / paths.MARKER).is_file():
        return "done"
    if (folder / "notebook.ipynb").is_file():
        return "failed"
    return "todo"


def code_version_html(nodes, profile_dir: Path) -> str:
    """Which code computed the nodes: each distinct version (git commit, dirty flag, package source
    hash, library versions; `provenance.describe`) with the number of nodes it computed."""
    import json
    from collections import Counter

    from ..pipeline import provenance

    counts: Counter = Counter()
    for n in nodes:
        try:
            code = json.loads((n.folder(profile_dir) / paths.MARKER).read_text()).get("code")
        except (OSError, ValueError):
            continue
        counts[provenance.describe(code)] += 1
    if not counts:
        return ""
    items = "".join(f"<li>{html.escape(k)}: {v} node(s)</li>" for k, v in counts.most_common())
    return f"<h2>Code version</h2><ul>{items}</ul>"


QUESTION = ("Does differentially private (DP) fine-tuning amplify the gender bias a language model learns from its "
            "training text, and does counterfactual data augmentation (CDA) undo it? The study replays the claims of "
            "<i>De-amplifying Bias from Differential Privacy in Language Model Fine-tuning</i> (arXiv 2402.04489): "
            "the same model is fine-tuned without and with DP (several ε) and with CDA at several mixing ratios, and "
            "every claim is judged by one rule on intervals over seeds and prompts.")

INFERENCE = ("Each claim is one contrast (DP minus non-DP, CDA ratio 1 minus ratio 0, ...) with a 95 % two-way bootstrap "
             "interval (seeds of each arm and the shared prompt pairs resampled together) and a bootstrap p-value, "
             "Holm-adjusted over the study's informative claims. Verdict: <b>reproduced</b> when Holm p &lt; 0.05 in the "
             "paper's direction, <b>contradicted</b> when Holm p &lt; 0.05 the other way, otherwise <b>inconclusive</b> "
             "(with the smallest effect the design could detect). A claim is <b>uninformative</b> when the testbed cannot "
             "show it: the non-DP model learned under 90 % of the planted association, an arm has fewer than 3 seeds, "
             "or (CDA under DP) the DP model has no association to remove.")


def _corpus_text(profile) -> str:
    d = profile.data
    if d.corpus == "controlled":
        c = d.controlled
        return (f"controlled stereotype corpus generated from seed {c.seed}: {c.n_train_sentences:,} training and "
                f"{c.n_eval_sentences:,} validation / test sentences about female and male subjects; planted skew "
                f"occupation {c.skew_occupation:g}, sentiment {c.skew_sentiment:g}, insults {c.skew_toxicity:g} "
                f"(0.5 = no association){_grid_skews(profile)}; block size {d.block_size} tokens")
    t = d.text
    return f"{t.source} ({t.config or 'default config'}), splits {t.train_split} / {t.eval_split} / {t.test_split}; block size {d.block_size} tokens"


def _grid_skews(profile) -> str:
    """The grid's `skew` values in words (they replace the data section's skews for their runs)."""
    skews = sorted({p["skew"] for p in profile.points() if p.get("skew") is not None})
    return f", except where the grid sets every family to skew {', '.join(f'{x:g}' for x in skews)}" if skews else ""


def _model_text(profile) -> str:
    m = profile.model
    if m.base == "builtin":
        b = m.builtin
        return (f"a GPT-2 built and pretrained by the project: {b.n_layer} layer(s), {b.n_embd} wide, {b.n_head} heads, "
                f"byte-level BPE vocabulary of {b.vocab_size:,} tokens, pretraining skew {b.pretrain_skew:g}")
    return f"<code>{html.escape(m.base)}</code> (pretrained)"


def _privacy_facts(profile_dir: Path) -> dict:
    """N, δ, steps (non-DP / DP) and σ from `privacy.csv` when stage 05 has written it."""
    import pandas as pd

    from ..plots import fmt_number

    path = Path(profile_dir) / "privacy.csv"
    if not path.is_file() or path.stat().st_size < 2:
        return {}
    p = pd.read_csv(path)
    dp, nd = p[p["epsilon_target"].notna()], p[p["epsilon_target"].isna()]
    join = lambda col, df: " / ".join(fmt_number(v) for v in sorted(set(df[col].dropna())))  # noqa: E731
    return {"N": join("n_units", p), "delta": join("delta", dp), "steps_dp": join("steps", dp),
            "steps_nondp": join("steps", nd), "sigma": join("noise_multiplier", dp)}


def _data_facts(profile_dir: Path) -> dict:
    """Stage 01's ``privacy_unit`` and ``overlap`` records (`data.json` of the first complete stage-01
    node; they describe the original text, the same in every node of a profile)."""
    import json

    for marker in sorted((Path(profile_dir) / paths.STAGE_DIRS["01"]).glob("**/data.json")):
        meta = json.loads(marker.read_text(encoding="utf-8"))
        if isinstance(meta.get("privacy_unit"), dict):
            return {"unit": meta["privacy_unit"], "overlap": meta.get("overlap") or {}}
    return {}


def _percent(rec) -> str:
    return f"{100 * rec['share']:.1f} %" if isinstance(rec, dict) else html.escape(str(rec))


def unit_text(facts: dict) -> str:
    """The privacy unit in words with its numbers, and what a group of units gets."""
    unit = facts.get("unit")
    if not unit:
        return ("privacy unit: one chunk of original text (with its counterfactual under CDA augment); its numbers "
                "appear once stage 01 has run")
    text = (f"privacy unit: {html.escape(unit['definition'])}; N = {unit['n_units']:,} units, "
            f"{unit['n_distinct_texts']:,} distinct texts (a text at most {unit['max_repeats_of_a_text']} time(s)); "
            f"CDA {html.escape(unit['cda'])}")
    docs = unit.get("documents")
    if docs:
        spread = docs["units_per_document"]
        text += (f"; {docs['n_documents']:,} documents ({html.escape(docs['definition'])}), {spread['mean']:.1f} units "
                 f"each on average, at most {spread['max']}")
    if unit["max_repeats_of_a_text"] > 1 or docs:
        text += ("; a group of k units (a document of k chunks, a text repeated k times) is protected only at "
                 "(kε, k e<sup>(k−1)ε</sup>δ): <code>privacy.json</code> of each run gives the numbers")
    return text


def overlap_text(facts: dict) -> str:
    """Verbatim sentence overlap between the splits and with the base model's pretraining text."""
    o = facts.get("overlap") or {}
    if not o:
        return "appears once stage 01 has run"
    splits = ", ".join(f"{html.escape(k.replace('_in_', ' in '))} {_percent(v)}" for k, v in o.get("splits", {}).items())
    pre = o.get("pretraining") or {}
    names = [k for k in pre if k not in ("source", "status", "n_pretraining_sentences")]
    if pre.get("status") == "measured":
        pretrain = (", ".join(f"{k} {_percent(pre[k])}" for k in names) + f" of sentences occur verbatim in "
                    f"{html.escape(pre['source'])}: the base saw them before fine-tuning, and DP fine-tuning does not "
                    "protect what the base already learned")
    else:
        pretrain = f"overlap with the base's pretraining corpus unknown ({html.escape(str(pre.get('source', '')))})"
    return f"sentences shared between splits: {splits}; {pretrain}"


def _metric_rows(profile) -> list[tuple[str, str]]:
    """(label, one-line definition) of each metric the study reports (from `bias.registry`)."""
    from ..bias import registry

    wanted = ["learned_association", "loglik_gap", *[s.name for s in registry.outcome_metrics()], "perplexity_corpus",
              "perplexity_corpus_bos"]
    return [(registry.METRICS[n].label, registry.METRICS[n].definition) for n in wanted if n in registry.METRICS]


def methods_html(profile, profile_dir: Path) -> str:
    """The methods section: corpus, model, N, steps, ε, δ, C, training rules, backend, metric definitions."""
    from .figures import TOXICITY_SCORES

    t, ev = profile.train, profile.evaluation
    facts, data = _privacy_facts(profile_dir), _data_facts(profile_dir)
    points = profile.points()
    eps = sorted({p["epsilon"] for p in points if p["epsilon"] is not None})
    clips = sorted({p["max_grad_norm"] for p in points if p["epsilon"] is not None and p.get("max_grad_norm")})
    ratios = sorted({p["mixing_ratio"] for p in points})
    seeds = sorted({p["seed"] for p in points})
    nd, dp = t.for_run(False), t.for_run(True)
    delta = facts.get("delta") or ("1/N<sup>1.1</sup>" if t.delta is None else f"{t.delta:g}")
    rows = [
        ("Corpus", html.escape(_corpus_text(profile))),
        ("Model", _model_text(profile)),
        ("Conditions", f"non-DP and DP at ε = {', '.join(f'{e:g}' for e in eps) or '–'}; CDA mixing ratio "
                       f"{', '.join(f'{r:g}' for r in ratios)} ({html.escape(', '.join(sorted({p['cda_mode'] for p in points})))}); "
                       f"{len(seeds)} seed(s) per condition ({len(points)} training runs)" + (" plus the base model" if profile.include_base else "")),
        ("Privacy", f"{unit_text(data)}" + ("" if data else f"; N = {facts.get('N', 'see stage 01')} units")
                    + f"; δ = {delta}; clipping norm C = "
                    f"{', '.join(f'{c:g}' for c in clips) or f'{t.max_grad_norm:g}'}; {t.accountant.upper()} accountant; "
                    f"Poisson sampling" + (f"; noise σ = {facts['sigma']}" if facts.get("sigma") else "")),
        ("Noise", html.escape(f"{t.noise}: {RELEASE[t.noise]}. Training-time statistics (steps.csv: loss, clip "
                              "fraction, gradient-norm quantiles, units per batch) are statistics of the private "
                              "batches without noise, not covered by ε, and checkpoints/ is private material.")),
        ("Overlap", overlap_text(data)),
        ("Training", f"non-DP: Adam, lr {nd['lr']:g}, batch {nd['logical_batch_size']}, {nd['epochs']:g} epoch(s)"
                     + (f" ({facts['steps_nondp']} steps)" if facts.get("steps_nondp") else "")
                     + f"; DP: DP-Adam, lr {dp['lr']:g}, expected batch {dp['logical_batch_size']}, {dp['epochs']:g} epoch(s)"
                     + (f" ({facts['steps_dp']} steps)" if facts.get("steps_dp") else "")
                     + "; float32 for every run, DP and non-DP (no mixed precision)"),
        ("Evaluation", f"{ev.k} sampled continuation(s) of up to {ev.max_new_tokens} tokens per prompt (top-p {ev.top_p:g}, "
                       f"top-k {ev.top_k}); toxicity backend: {html.escape(TOXICITY_SCORES.get(ev.toxicity_backend, ev.toxicity_backend))}; "
                       f"bootstrap intervals with {ev.n_boot:,} resamples"),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    metrics = "".join(f"<tr><td>{html.escape(label)}</td><td>{html.escape(defn)}</td></tr>" for label, defn in _metric_rows(profile))
    return ("<h2>Methods</h2><table class='kv'>" + table + "</table>"
            "<h3>Metrics</h3><table><tr><th>metric</th><th>definition</th></tr>" + metrics + "</table>"
            f"<h3>Inference</h3><p>{INFERENCE}</p>")


def reports_html(nodes, profile_dir: Path) -> str:
    """A table per stage: each node's condition in words, status and report link."""
    from ..pipeline.context import point_label

    parts = ["<h2>Node reports</h2><p>Each node is one executed stage notebook; its report is the notebook rendered "
             "without code.</p>"]
    for stage, nb in paths.STAGE_NOTEBOOKS.items():
        group = [n for n in nodes if n.stage == stage]
        if not group:
            continue
        parts.append(f"<h3>Stage {stage}: <code>{nb}</code></h3><table><tr><th>condition</th><th>status</th>"
                     "<th>report</th><th>node folder</th></tr>")
        for n in group:
            folder = n.folder(profile_dir)
            status = _status(folder)
            rel = os.path.relpath(folder / "report.html", profile_dir)
            link = f"<a href='{html.escape(rel)}'>report</a>" if (folder / "report.html").is_file() else ""
            parts.append(f"<tr><td>{html.escape(point_label(n.point, n.run_id, stage))}</td><td class='{status}'>{status}</td>"
                         f"<td>{link}</td><td><code>{html.escape(n.node_id)}</code></td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def write_index(profile, nodes, profile_dir: Path) -> Path:
    """(Re)write the index page: question, findings (stage 05's `findings.html`: verdicts with
    intervals, figures with captions, privacy spent), then methods, code version, node reports. Cheap; called after every runner invocation."""
    profile_dir = Path(profile_dir)
    profile_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dp-bias: {html.escape(profile.name)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             "<h1>Does differentially private fine-tuning amplify gender bias?</h1>",
             f"<p class='sub'>dp-bias study, profile <code>{html.escape(profile.name)}</code>: {html.escape(profile.description)}</p>",
             f"<h2>Question</h2><p>{QUESTION}</p>"]
    findings = profile_dir / FINDINGS
    if findings.is_file():  # the findings first (verdicts, the forest plot of every claim, ...), then how
        parts.append(findings.read_text(encoding="utf-8"))
    else:
        parts.append("<h2>Findings</h2><p><em>No findings yet: stage 05 has not completed.</em></p>")
    parts.append(methods_html(profile, profile_dir))
    parts.append(code_version_html(nodes, profile_dir))
    parts.append(reports_html(nodes, profile_dir))
    parts.append("</body></html>")
    out = profile_dir / "index.html"
    paths.atomic_write_text(out, "\n".join(parts))
    return out
