"""Stage 05's findings: every claim judged (`claims`), the findings text (markdown, the single source
of index.html's findings and the docs/results page's generated block) and its HTML.
"""
from __future__ import annotations

import html
import sys
from pathlib import Path

import pandas as pd

from .. import paths
from ..bias.perplexity import CORPUS as PPL
from ..params import NON_DP, privacy_label
from ..seeds import NOISE_LABEL
from ..training.methods import DP_ADAM, default_method
from . import claims, nonbinary, regimes, sweep
from .claims import CLAIM_KINDS, verdict_word as _verdict_word  # the claim kinds live with the claims
from .figures import TOXICITY_SCORES, figure_list
from .tables import ci_text, md_table, association_summary, condition_order, epsilon_of, seed_summary, table1


# --------------------------------------------------------------------------- findings
def study_claims(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:

    if tables["items"].empty:
        return pd.DataFrame()
    extra = (regimes.regime_claims(tables["items"], tables["results"], tables.get("trajectory"), tables.get("privacy"))
             + sweep.sweep_claims(tables["items"], tables.get("gradnorms"))
             + nonbinary.nonbinary_claims(tables["items"], tables["results"]))
    return claims.study_claims(tables["items"], tables["results"], tables.get("trajectory"), extra=extra)


def claims_display(judged: pd.DataFrame):
    """The judged claims as a reader sees them (whole, not truncated): claim, contrast, estimate
    with interval, Holm p, verdict."""
    from ..plots import Table

    if judged.empty:
        return "No claim could be formed from these runs."
    return Table(pd.DataFrame({"claim": judged["claim"], "contrast": judged["contrast"],
                               "estimate [95% CI]": [claims.format_interval(r) for _, r in judged.iterrows()],
                               "p (Holm)": ["" if pd.isna(p) else f"{p:.3g}" for p in judged["p_holm"]],
                               "verdict": judged["verdict"]}), index=False)


def verdict_summary(judged: pd.DataFrame) -> list[str]:
    """One markdown bullet per kind of claim: how many contrasts, and their verdicts by the rule of
    `inference.judge_claims` (never more than the verdicts say)."""
    if judged.empty:
        return []
    kind = judged["id"].str.split("/").str[0]
    lines = []
    for k, text in CLAIM_KINDS.items():
        sub = judged[kind == k]
        if sub.empty:
            continue
        counts = sub["verdict"].map(_verdict_word).value_counts()
        parts = ", ".join(f"{word} {n}" for word, n in counts.items())
        lines.append(f"- **{text}** ({len(sub)} contrast{'s' if len(sub) > 1 else ''}): {parts}.")
    return lines


def _calibration_md(tables) -> list[str]:

    cal = claims.calibration_table(tables["items"], tables["results"]) if not tables["items"].empty else pd.DataFrame()
    if cal.empty:
        return []
    rows = [[r["family"], f"{r['planted']:.2f}", f"{r['base']:.3f}",
             f"{r['non_dp']:.3f} [{r['non_dp_low']:.3f}, {r['non_dp_high']:.3f}]", f"{r['learned_fraction']:.0%}".replace("-0%", "0%"),
             "yes" if r["calibrated"] else "no"] for _, r in cal.iterrows()]
    return (["### Calibration", "", "Does the non-DP model learn what the corpus plants? (target: 90 % of the excess "
             "over 0.5; interval: 95 % two-way bootstrap over seeds and prompt pairs)", ""]
            + md_table(["family", "planted", "base", "non-DP [95% CI]", "learned fraction", "calibrated"], rows))


def _association_md(tables) -> list[str]:
    s = association_summary(tables["items"])
    if s.empty or set(s["condition"]) <= {"base"}:  # never a table of the base model alone
        return []
    wide = s.assign(cell=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(s["value"], s["ci_low"], s["ci_high"])])
    wide = wide.pivot(index="condition", columns="family", values="cell")
    wide = wide.reindex(sorted(wide.index, key=lambda c: (c != "base", c != "non-DP", epsilon_of(c))))
    return (["### Learned association", "", "0.5 = none; mean over seeds and prompt pairs, 95 % two-way bootstrap "
             "interval; CDA ratio 0.", ""]
            + md_table(["condition", *wide.columns], [[c, *wide.loc[c]] for c in wide.index]))


def _utility_md(tables) -> list[str]:
    ppl = seed_summary(tables["results"])
    ppl = ppl[(ppl["metric"] == PPL) & (ppl["group"] == "test") & (ppl["mixing_ratio"] == 0.0)]
    if ppl.empty or set(ppl["condition"]) <= {"base"}:  # never a table of the base model alone
        return []
    ppl = ppl.set_index("condition").reindex(condition_order(ppl))
    rows = [[c, f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", int(r["n_seeds"])] for c, r in ppl.iterrows()]
    return (["### Utility", "", "Test perplexity (mean over seeds, 95 % percentile bootstrap over seeds; one seed: "
             "that run's bootstrap over sentences).", ""] + md_table(["condition", "perplexity", "seeds"], rows))


def _claims_md(judged) -> list[str]:

    if judged.empty:
        return []
    rows = [[c["claim"], c["contrast"], claims.format_interval(c), "" if pd.isna(c["p_holm"]) else f"{c['p_holm']:.3g}",
             f"**{c['verdict']}**"] for _, c in judged.iterrows()]
    return (["### Claims", "", "Each claim is one contrast with its 95 % interval (two-way bootstrap over seeds and "
             "prompt pairs) and Holm-adjusted p over the informative claims. **reproduced** / **contradicted**: "
             "Holm p < 0.05 in / against the direction the claim states; otherwise **inconclusive**, or **uninformative** "
             "where the testbed cannot show the claim.", ""]
            + md_table(["claim", "contrast", "estimate [95% CI]", "p (Holm)", "verdict"], rows))


def _table1_md(tables, toxicity_backend: str) -> list[str]:
    t = table1(tables["results"])
    if t.empty:
        return []
    score = TOXICITY_SCORES.get(toxicity_backend, toxicity_backend)
    rows = [[cond, *[row.get(c, "–") for c in ("male", "female", "diff")]] for cond, row in t.iterrows()]
    return (["### Table 1 analog", "", f"Mean {score} of continuations (CDA ratio 0; mean over seeds, 95 % percentile "
             "bootstrap over seeds; one seed: that run's bootstrap over prompts).", ""]
            + md_table(["condition", "male", "female", "diff (female - male)"], rows))


def _privacy_md(tables) -> list[str]:
    from ..plots import fmt_number

    p = tables.get("privacy", pd.DataFrame())
    if len(p):  # private runs only: a noise-only run has an ε target but earns none (privacy.json `private`)
        private = p["private"].fillna(True).astype(bool) if "private" in p else True
        p = p[p["epsilon_target"].notna() & private]
    if p.empty:
        return []
    if "method" not in p:
        p = p.assign(method="dp-adam")
    rows = []
    for (method, eps), g in p.fillna({"method": "dp-adam"}).groupby(["method", "epsilon_target"]):
        spent = g["epsilon_spent"].astype(float)
        label = ("" if method == "dp-adam" else f"{method} · ") + f"DP ε={eps:g}"
        rows.append([label, " / ".join(sorted({noise_label(m) for m in g.get("noise_mode", [None])})), len(g),
                     fmt_number(spent.max()), " / ".join(fmt_number(d) for d in sorted(set(g["delta"]))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["noise_multiplier"].round(4)))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["sample_rate"].round(6)))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["steps"]))),
                     " / ".join(fmt_number(v) for v in sorted(set(g["n_units"]))), str(g["accountant"].iloc[0]).upper()])
    return (["### Privacy spent", "", "DP runs by target ε (non-DP runs have no privacy guarantee); the ε spent is the "
             "accountant's for the steps actually taken, largest over the runs. " + NOISE_NOTE, ""]
            + md_table(["condition", "noise", "runs", "ε spent (max)", "δ", "noise σ", "sampling rate q", "steps",
                         "privacy units N", "accountant"], rows))


def _sweep_md(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The findings' mechanism-sweep section (empty when the profile has no sweep runs)."""
    items, privacy = tables.get("items", pd.DataFrame()), tables.get("privacy", pd.DataFrame())
    grid = sweep.amplification_grid(items)
    if grid.empty:
        return []
    cal = sweep.calibration_by_skew(sweep.pooled_association(items))
    lines = ["### Mechanism sweep", "", "Amplification = learned association (the three families pooled) minus the "
             "non-DP model's at the same planted skew: > 0 DP amplifies, < 0 DP attenuates; mean over seeds and prompt "
             "pairs, 95 % two-way bootstrap interval (seeds and prompt pairs resampled together). A skew whose non-DP "
             "model is not calibrated is shown but enters no claim.", ""]
    for eps, g in grid.groupby("epsilon"):
        clips = sorted(set(g["max_grad_norm"]))
        rows = [[f"{skew:g}" + ("" if cal[skew][0] else " (not calibrated)"),
                 *[next((ci_text(r["value"], r["ci_low"], r["ci_high"]) for _, r in g.iterrows()
                         if r["skew"] == skew and r["max_grad_norm"] == c), "–") for c in clips]]
                for skew in sorted(set(g["skew"]))]
        lines += [f"Dose-response, dp-adam at {privacy_label(eps)}:", ""] + md_table(
            ["planted skew", *[f"C={c:g}" for c in clips]], rows) + [sign_sentence(g, cal), ""]
    bars = sweep.method_amplification(items, privacy)
    if len(bars):
        lines += ["Ways of training at skew {:g}, C={:g} (method − non-DP):".format(
            bars["skew"].iloc[0], bars["max_grad_norm"].iloc[0]), ""]
        lines += md_table(["method", "amplification [95% CI]", "private", "seeds"],
                           [[r["method"], ci_text(r["value"], r["ci_low"], r["ci_high"]), "yes" if r["private"] else "no",
                             r["n_seeds"]] for _, r in bars.iterrows()])
    return lines + _cda_vs_global_md(sweep.cda_vs_global(items, tables.get("results", pd.DataFrame()), privacy))


def sign_sentence(grid: pd.DataFrame, cal: dict[float, tuple[bool, str]]) -> str:
    """How many cells of an amplification grid, at the calibrated skews, lie wholly below / above 0."""
    g = grid[[cal[s][0] for s in grid["skew"]]]
    below, above = int((g["ci_high"] < 0).sum()), int((g["ci_low"] > 0).sum())
    return (f"At the calibrated skews, {below} of {len(g)} cells lie wholly below 0 (DP attenuates), {above} wholly "
            f"above 0 (DP amplifies), {len(g) - below - above} include 0.")


def _cda_vs_global_md(table: pd.DataFrame) -> list[str]:
    """The CDA-vs-Global table: association, minus non-DP, lower than dp-adam by, perplexity, ε, private."""
    from ..plots import fmt_number

    if table.empty:
        return []
    lines = ["CDA against DPSGD-Global (vs non-DP = the arm's association minus non-DP's; lower than dp-adam by = "
             "dp-adam's association minus the arm's; perplexity: test text, mean over seeds with a bootstrap over "
             "seeds):", ""]
    return lines + md_table(
        ["arm", "association [95% CI]", "vs non-DP [95% CI]", "lower than dp-adam by [95% CI]", "perplexity", "ε spent",
         "private"],
        [[r["arm"], ci_text(r["association"], r["association_low"], r["association_high"], ".3f"),
          ci_text(r["vs_nondp"], r["vs_nondp_low"], r["vs_nondp_high"]),
          "–" if r["arm"] == DP_ADAM else ci_text(r["lowered"], r["lowered_low"], r["lowered_high"]),
          ci_text(r["perplexity"], r["perplexity_low"], r["perplexity_high"], ".2f"),
          fmt_number(r["epsilon_spent"]) if r["private"] else "∞ (not private)", "yes" if r["private"] else "no"]
         for _, r in table.iterrows()])


def findings_markdown(tables: dict[str, pd.DataFrame], judged: pd.DataFrame, toxicity_backend: str = "profanity") -> str:
    """The study's findings as markdown: verdict summary, calibration, association, utility, every
    claim with its interval and verdict, Table 1. The docs/results page's block and the report's
    findings are both rendered from this text."""
    summary = verdict_summary(judged)
    lines = (["### Summary of verdicts", "", *summary, ""] if summary else [])
    for part in (regimes.regime_md(tables, judged), _calibration_md(tables), _association_md(tables), _utility_md(tables),
                 _sweep_md(tables),
                 nonbinary.nonbinary_md(tables),
                 _claims_md(judged), _table1_md(tables, toxicity_backend), _privacy_md(tables)):
        lines += part
    return "\n".join(lines).rstrip() + "\n"


def markdown_to_html(text: str) -> str:
    """Markdown (with tables) to HTML, as the report shows findings.md."""
    import mistune

    return mistune.create_markdown(plugins=["table"], escape=True)(text)


NOISE_NOTE = ("Noise \"simulation of DP\": the sampling and noise seeds derive from the recorded seed, so the model "
              "is not a private release; \"private release\": they come from a secret never written. Neither covers "
              "steps.csv (loss, clip fraction, gradient-norm quantiles, batch sizes of the private batches, without "
              "noise) or checkpoints/: diagnostics only, not for release.")


def noise_label(mode) -> str:
    """The privacy table's words for a DP run's noise mode; runs recorded before noise modes existed drew
    their noise from the seed: a simulation."""
    return NOISE_LABEL.get(mode if isinstance(mode, str) else "reproducible", str(mode))


def privacy_table(privacy: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """One readable row per training run: condition in words, the way of training and whether it is
    private (privacy.json's `private`), ε target / spent ("non-DP" spelled out; ∞ for a run that is not
    private), exact δ (6.98e-5, not 0.0001), σ, q, steps, N, accountant."""
    from ..plots import fmt_number

    if privacy.empty:
        return pd.DataFrame()
    cond = results.drop_duplicates("run_id").set_index("run_id") if not results.empty else pd.DataFrame()
    rows = []
    for _, r in privacy.iterrows():
        c = cond.loc[r["run_id"]] if r["run_id"] in cond.index else None
        dp = pd.notna(r["epsilon_target"])
        method = r["method"] if "method" in r and pd.notna(r["method"]) else default_method(r["epsilon_target"] if dp else None)
        private = bool(r["private"]) if "private" in r and pd.notna(r["private"]) else dp
        label = privacy_label(r["epsilon_target"] if dp else None)
        if method != default_method(r["epsilon_target"] if dp else None):
            label = f"{method} · {label}"
        if c is not None:
            if pd.notna(c.get("base_skew")):  # a regime-map run (`regimes`): its base and N tell it apart
                label += f" · base {float(c['base_skew']):g}"
                label += f" · N {int(c['n_units'])}" if pd.notna(c.get("n_units")) else ""
            if pd.notna(c.get("skew")):  # a sweep run (`sweep`): its C and planted skew tell it apart
                label += f" · C={float(c['max_grad_norm']):g}" if pd.notna(c["max_grad_norm"]) else ""
                label += f" · skew {float(c['skew']):g}"
            label += f" · CDA {float(c['mixing_ratio']):g} · seed {int(c['seed'])}"
        rows.append({"condition": label, "method": method, "private": "yes" if private else "no",
                     "noise": noise_label(r.get("noise_mode")) if dp else "–",
                     "ε target": fmt_number(r["epsilon_target"]) if dp else NON_DP,
                     "ε spent": (fmt_number(r["epsilon_spent"]) if private
                                 else f"∞ ({NON_DP})" if method == "nondp" else "∞ (not private)"),
                     "δ": fmt_number(r["delta"]) if dp else "–", "noise σ": fmt_number(r["noise_multiplier"]) if dp else "–",
                     "sampling rate q": fmt_number(r["sample_rate"]) if dp else "–", "steps": fmt_number(r["steps"]),
                     "privacy units N": fmt_number(r["n_units"]),
                     "accountant": str(r["accountant"]).upper() if dp and pd.notna(r["accountant"]) else "–",
                     "_key": (dp, r["epsilon_target"] if dp else -1, label)})
    return pd.DataFrame(rows).sort_values("_key").drop(columns="_key").set_index("condition")


def findings_html(markdown_text: str, privacy: pd.DataFrame, figures: list[tuple[str, str]]) -> str:
    """The fragment `index.html` shows as its findings: findings.md rendered, the figures with their
    captions, then the privacy actually spent."""
    parts = ["<h2>Findings</h2>", markdown_to_html(markdown_text)]
    if figures:
        parts.append("<h3>Figures</h3>")
    for i, (src, caption) in enumerate(figures, 1):
        parts.append(f"<figure><img src='{html.escape(src)}' alt='figure {i}'>"
                     f"<figcaption><b>Figure {i}.</b> {html.escape(caption)}</figcaption></figure>")
    if len(privacy):
        parts.append("<h3>Privacy spent</h3><p>Per training run, from the accountant (the ε reported is the one "
                     "computed for the steps actually taken). " + html.escape(NOISE_NOTE) + "</p>"
                     + privacy.to_html(border=0))
    return "\n".join(parts)


def write_findings(profile_dir: Path, tables: dict[str, pd.DataFrame], figures_dir: Path,
                   toxicity_backend: str = "profanity", judged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write `claims.csv`, `findings.md` and `findings.html` (shown in index.html); for a published
    profile (`readme.PUBLISHED`) in the repository's runs folder also copy the figures and findings.md to
    its figures folder and regenerate its docs/results page's block (and the README's verdicts) from it."""
    profile_dir, figures_dir = Path(profile_dir), Path(figures_dir)
    judged = study_claims(tables) if judged is None else judged  # notebook 05 judges first, shows the verdicts
    paths.atomic_write_text(profile_dir / "claims.csv", judged.to_csv(index=False))
    md = findings_markdown(tables, judged, toxicity_backend)
    paths.atomic_write_text(profile_dir / "findings.md", md)
    privacy = privacy_table(tables["privacy"], tables["results"])
    figures = figure_list(figures_dir, profile_dir, toxicity_backend)
    paths.atomic_write_text(profile_dir / "findings.html", findings_html(md, privacy, figures))
    if profile_dir.parent.resolve() == (paths.REPO_ROOT / "runs").resolve():
        publish(profile_dir, figures_dir, regimes.headline_md(tables, judged, profile_dir.name))
    return judged


def publish(profile_dir: Path, figures_dir: Path, headline: str = "") -> None:
    """A published profile's figures and findings.md into its figures folder, its block in
    docs/results/<profile>.md and the README's verdict table rewritten from them (nothing for a profile
    `readme.PUBLISHED` does not name); the default profile's regime ``headline`` (`regimes.headline_md`)
    becomes the README's headline block (figures/regimes.md)."""
    import shutil

    from . import readme

    which = readme.PUBLISHED.get(Path(profile_dir).name)
    if which is None:
        return
    which.folder.mkdir(parents=True, exist_ok=True)
    drawn = sorted(Path(figures_dir).glob("*.png")) + sorted(Path(figures_dir).glob("*.svg"))
    for f in sorted(which.folder.glob("*.png")) + sorted(which.folder.glob("*.svg")):
        if f.name not in {d.name for d in drawn}:
            f.unlink()  # a figure this run did not draw (e.g. one of the base alone) is no longer published
    for f in drawn:
        shutil.copy2(f, which.folder / f.name)
    shutil.copy2(Path(profile_dir) / "findings.md", which.findings)
    for block in (which, readme.VERDICTS):  # its findings page, then the README's verdict table
        try:
            readme.update_block(block)
        except (ValueError, OSError) as exc:  # a page without the block: the report and the copies stand
            print(f"generated block {block.name} not rewritten: {exc}", file=sys.stderr)
    if headline and which is readme.DEFAULT:
        try:
            readme.write_block(readme.REGIMES, headline)
        except (ValueError, OSError) as exc:
            print(f"generated block {readme.REGIMES.name} not rewritten: {exc}", file=sys.stderr)
