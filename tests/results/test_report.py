"""Report presentation: figures that draw data and save deterministically, readable tables, and the
README's results block generated from the same findings markdown as the report."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dpbias_utils import paths, plots, results  # noqa: E402
from dpbias_utils.results import readme  # noqa: E402
from dpbias_utils.results import findings  # noqa: E402


def test_empty_panels_ignores_reference_lines_and_finds_data():
    fig, (a, b, c) = plt.subplots(1, 3)
    a.axhline(0.0)  # a reference line alone is no data
    a.set_title("empty")
    b.plot([0, 10, 20], [np.nan, 1.0, np.nan])  # one finite point and no marker draws nothing
    b.set_title("one point, no marker")
    c.errorbar([0.0], [1.0], yerr=[[0.1], [0.2]], fmt="o")
    assert plots.empty_panels(fig) == ["empty", "one point, no marker"]
    plt.close(fig)


def test_training_curves_draw_epsilon_logged_every_few_steps():
    steps = pd.DataFrame({"step": range(1, 31), "loss": np.linspace(3, 2, 30),
                          "epsilon_spent": [i / 10 if i % 10 == 0 else np.nan for i in range(1, 31)],
                          "clip_fraction": np.linspace(1, 0.5, 30)})
    shown = plots.training_curves(steps, title="dp run")
    assert len(shown.panels) == 3 and shown.empty == []
    data, meta = shown._repr_mimebundle_()
    assert data["image/png"] and meta["dpbias"] == {"panels": 3, "empty_panels": []}


def test_non_dp_training_curves_have_no_empty_privacy_panel():
    steps = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.0], "epsilon_spent": [np.nan] * 3,
                          "clip_fraction": [np.nan] * 3})
    shown = plots.training_curves(steps, title="non-DP run")
    assert len(shown.panels) == 1 and shown.empty == []


def test_generations_scores_are_columns(tmp_path):
    rows = [{"group": g, "prompt": "p", "continuation": "c", "prompt_id": f"{i}:{g}", "scores": {"toxicity": 0.1 * i, "sentiment": -0.2}}
            for i in range(4) for g in ("female", "male")]
    (tmp_path / "generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gens = plots.read_generations(tmp_path)
    examples = plots.example_generations(gens, n=2)
    assert {"toxicity", "sentiment"} <= set(examples.columns) and examples["toxicity"].notna().all()
    shown = plots.score_distributions(gens)
    assert len(shown.panels) == 2 and shown.empty == []


def test_save_figure_is_deterministic(tmp_path):
    def draw(folder):
        fig, ax = plt.subplots()
        ax.errorbar([0, 1], [1.0, 2.0], yerr=[0.1, 0.2], fmt="o", label="x")
        ax.legend()
        plots.save_figure(fig, folder, "f")
        plt.close(fig)
    draw(tmp_path / "a")
    draw(tmp_path / "b")
    for ext in ("svg", "png"):
        assert (tmp_path / "a" / f"f.{ext}").read_bytes() == (tmp_path / "b" / f"f.{ext}").read_bytes(), ext
    assert "<dc:date>" not in (tmp_path / "a" / "f.svg").read_text()


def test_numbers_and_privacy_table_are_readable():
    assert plots.fmt_number(6.98e-5) == "6.98e-5" and plots.fmt_number(0.0427) == "0.0427"
    assert plots.fmt_number(6000.0) == "6,000" and plots.fmt_number(float("nan")) == "–"
    privacy = pd.DataFrame({"run_id": ["a", "b"], "epsilon_target": [np.nan, 3.0], "epsilon_spent": [np.nan, 2.993],
                            "delta": [np.nan, 6.98e-5], "noise_multiplier": [np.nan, 0.818], "sample_rate": [np.nan, 0.0427],
                            "steps": [938, 47], "n_units": [6000, 6000], "accountant": [np.nan, "prv"]})
    res = pd.DataFrame({"run_id": ["a", "b"], "dp": [False, True], "epsilon": [np.inf, 3.0], "mixing_ratio": [0.0, 0.0],
                        "seed": [0, 1]})
    table = results.privacy_table(privacy, res)
    text = table.to_string()
    assert "nan" not in text.lower() and "6.98e-5" in text and "0.0001" not in text
    assert list(table.index) == ["non-DP · CDA 0 · seed 0", "DP ε=3 · CDA 0 · seed 1"]
    assert table["ε target"].iloc[0] == "non-DP"
    assert table["private"].tolist() == ["no", "yes"] and table["method"].tolist() == ["nondp", "dp-adam"]


def test_privacy_table_says_which_ablation_runs_are_private():
    """privacy.json's `private` (issue 16): a noise-only run has a target but no ε spent, a clip-only run neither."""
    privacy = pd.DataFrame({"run_id": ["c", "n", "g"], "method": ["clip-only", "noise-only", "global-adapt"],
                            "private": [False, False, True], "epsilon_target": [np.nan, 3.0, 3.0],
                            "epsilon_spent": [np.nan, np.nan, 2.99], "delta": [6.98e-5] * 3,
                            "noise_multiplier": [0.0, 0.818, 0.818], "sample_rate": [0.0427] * 3, "steps": [47] * 3,
                            "n_units": [6000] * 3, "accountant": ["prv"] * 3})
    table = results.privacy_table(privacy, pd.DataFrame())
    rows = table.set_index("method")
    assert rows.loc["clip-only", "private"] == rows.loc["noise-only", "private"] == "no"
    assert rows.loc["noise-only", "ε spent"] == rows.loc["clip-only", "ε spent"] == "∞ (not private)"
    assert rows.loc["global-adapt", "private"] == "yes" and rows.loc["global-adapt", "ε spent"] == "2.99"
    assert "noise-only · DP ε=3" in list(table.index)
    from dpbias_utils.results.findings import _privacy_md

    md = "\n".join(_privacy_md({"privacy": privacy}))
    assert "| global-adapt · DP ε=3 |" in md and "| 2.99 |" in md and "noise-only" not in md and "clip-only" not in md


def test_privacy_outputs_state_the_noise_mode_and_what_epsilon_does_not_cover(tmp_path):
    """Issue 15: a study run is labelled a simulation of DP in the privacy table, the findings and the
    report's methods; steps.csv's statistics are captioned as not covered by ε."""
    from dpbias_utils import params
    from dpbias_utils.results import report

    privacy = pd.DataFrame({"run_id": ["a", "b", "c"], "epsilon_target": [np.nan, 3.0, 3.0],
                            "epsilon_spent": [np.nan, 2.99, 2.99], "delta": [np.nan, 7e-5, 7e-5],
                            "noise_multiplier": [np.nan, 0.8, 0.8], "sample_rate": [np.nan, 0.04, 0.04],
                            "steps": [900, 47, 47], "n_units": [6000] * 3, "accountant": [np.nan, "prv", "prv"],
                            "noise_mode": [None, "reproducible", "secret"]})
    res = pd.DataFrame({"run_id": ["a", "b", "c"], "dp": [False, True, True], "epsilon": [np.inf, 3.0, 3.0],
                        "mixing_ratio": [0.0] * 3, "seed": [0, 1, 2]})
    table = results.privacy_table(privacy, res)
    assert table["noise"].tolist() == ["–", "simulation of DP", "private release"]
    md = "\n".join(findings._privacy_md({"privacy": privacy}))
    assert "private release / simulation of DP" in md and "not a private release" in md and "steps.csv" in md
    steps = pd.DataFrame({"step": [1, 2], "loss": [3.0, 2.0], "epsilon_spent": [0.1, 0.2], "clip_fraction": [1.0, 0.9]})
    title = plots.training_curves(steps, title="dp").fig._suptitle.get_text()
    assert "statistics of the private batches, not covered by ε (diagnostics only; not for release)" in title
    (tmp_path / "privacy.json").write_text(json.dumps({
        "epsilon_target": 3.0, "noise_mode": "reproducible", "release": "simulation of DP: x",
        "not_covered_by_epsilon": {"steps.csv": ["loss", "clip_fraction"], "checkpoints/": "private material"}}))
    rows = plots.privacy_record(tmp_path).rows
    assert rows["noise mode"] == "reproducible" and rows["release"] == "simulation of DP: x"
    assert rows["not covered by ε"] == "steps.csv: loss, clip_fraction; checkpoints/: private material"
    profile = params.load_profile(paths.REPO_ROOT / "tests" / "profiles" / "tiny.yaml")
    methods = report.methods_html(profile, tmp_path)
    assert ("<th>Noise</th><td>reproducible: simulation of DP: the noise and sampling seeds derive from the "
            "recorded seed, so this model is not a private release.") in methods
    assert "not covered by ε" in methods and "float32" in methods


def test_seed_intervals_stay_inside_bounds():
    rows = []
    for seed, v in enumerate([0.98, 1.0, 0.99]):
        rows.append({"run_id": f"r{seed}", "model": "m", "dp": True, "epsilon": 3.0, "max_grad_norm": 0.1,
                     "mixing_ratio": 0.0, "cda_mode": "substitute", "seed": seed, "metric": "gender_count_bias",
                     "group": "diff", "value": v, "ci_low": v - 0.5, "ci_high": v + 0.5, "n": 10})
    s = results.seed_summary(pd.DataFrame(rows))
    assert (s["ci_low"] >= -1).all() and (s["ci_high"] <= 1).all() and (s["ci_low"] <= s["value"]).all()


def _judged(verdicts):
    n = len(verdicts)
    return pd.DataFrame({"id": [f"amplify/occupation/{i}" for i in range(n)], "claim": ["c"] * n, "contrast": ["d"] * n,
                         "point": [0.01] * n, "low": [-0.1] * n, "high": [0.2] * n, "p_holm": [0.5] * n,
                         "verdict": verdicts})


def test_verdict_summary_counts_the_rule_s_verdicts_only():
    lines = results.verdict_summary(_judged(["inconclusive (could detect |effect| >= 0.2)", "contradicted",
                                             "uninformative: 1 vs 1 seeds"]))
    assert lines == ["- **DP amplifies the learned association** (3 contrasts): inconclusive 1, contradicted 1, uninformative 1."]
    md = "\n".join(findings._claims_md(_judged(["inconclusive (could detect |effect| >= 0.2)"])))
    html = results.markdown_to_html(md)
    table = html[html.index("<table>"):]
    assert "reproduced" not in table and "|effect|" in table and table.count("<td>") == 5


@pytest.mark.parametrize("which", readme.BLOCKS, ids=lambda b: b.name)
def test_generated_blocks_are_their_committed_sources(which):
    """Each generated block (the README's headline and verdicts, each published profile's findings in
    docs/results/<profile>.md) equals what its committed source generates; stage 05 rewrites them."""
    assert readme.is_current(which)
    assert readme.DEFAULT.findings == paths.FIGURES / "findings.md"
    assert readme.DEFAULT.doc == paths.DOCS / "results" / "default.md"


def test_publish_copies_a_published_profile_and_rewrites_its_page_and_the_verdicts(tmp_path, monkeypatch):
    page, rd = tmp_path / "docs" / "results" / "mechanism.md", tmp_path / "README.md"
    page.parent.mkdir(parents=True)
    which = readme.Block("mechanism-findings", tmp_path / "figures" / "mechanism" / "findings.md", page)
    monkeypatch.setitem(readme.PUBLISHED, "mechanism", which)
    verdicts = readme.VerdictBlock("verdicts", which.findings, rd)
    monkeypatch.setattr(readme, "VERDICTS", verdicts)
    page.write_text(f"# t\n\n{which.start}\nold\n{which.end}\n")
    rd.write_text(f"# r\n\n{verdicts.start}\nstale\n{verdicts.end}\n\nkept\n")
    prof = tmp_path / "runs" / "mechanism"
    (prof / "figures").mkdir(parents=True)
    (prof / "figures" / "a.png").write_bytes(b"png")
    which.folder.mkdir(parents=True)
    (which.folder / "base_only.png").write_bytes(b"stale")  # published before, not drawn by this run
    (prof / "findings.md").write_text("### Summary of verdicts\n\n- **C helps** (2 contrasts): reproduced 2.\n")
    findings.publish(prof, prof / "figures")
    assert (which.folder / "a.png").read_bytes() == b"png" and readme.is_current(which, page)
    assert not (which.folder / "base_only.png").exists()
    text = page.read_text()
    assert "C helps" in text and "old" not in text
    assert "| [mechanism](docs/results/mechanism.md) | C helps | 2 | reproduced 2 |" in rd.read_text()
    assert "kept" in rd.read_text() and "stale" not in rd.read_text()
    findings.publish(tmp_path / "runs" / "other", prof / "figures")  # a profile not published: nothing
    assert page.read_text() == text


def test_write_block_fills_the_readme_headline_from_its_text(tmp_path):
    rd = tmp_path / "README.md"
    rd.write_text(f"# q\n\n<!-- regimes:start -->\nplaceholder\n<!-- regimes:end -->\n\n## The answer\n")
    regimes = readme.Block("regimes", tmp_path / "figures" / "regimes.md", rd, writer="the regime map")
    assert readme.write_block(regimes, "DP amplifies where the base is more biased than the data.") is True
    text = rd.read_text()
    assert "DP amplifies where" in text and "placeholder" not in text and text.endswith("## The answer\n")
    assert regimes.findings.read_text() == "DP amplifies where the base is more biased than the data.\n"
    assert readme.is_current(regimes, rd) and readme.write_block(regimes, "DP amplifies where the base is more biased than the data.") is False


def test_verdict_table_takes_each_profile_s_summary_only():
    md = ("### Summary of verdicts\n\n- **A** (1 contrast): reproduced 1.\n- **B** (3 contrasts): contradicted 2, "
          "inconclusive 1.\n\n### Claims\n\n- **not a summary** (9 contrasts): reproduced 9.\n")
    assert readme.verdict_table({"p": md}).splitlines()[2:] == [
        "| [p](docs/results/p.md) | A | 1 | reproduced 1 |", "| [p](docs/results/p.md) | B | 3 | contradicted 2, inconclusive 1 |"]


def test_readme_update_rewrites_only_the_block(tmp_path):
    md, rd = tmp_path / "findings.md", tmp_path / "README.md"
    md.write_text("### Summary of verdicts\n\n- x\n")
    rd.write_text(f"# t\n\nbefore\n\n{readme.START}\nold\n{readme.END}\n\nafter\n")
    assert readme.update_readme(rd, md) is True
    text = rd.read_text()
    assert text.startswith("# t\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "- x" in text and "old" not in text
    assert readme.update_readme(rd, md) is False
    rd.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        readme.update_readme(rd, md)


def test_methods_state_the_privacy_unit_and_the_overlaps_from_stage01(tmp_path):
    from dpbias_utils.params import load_profile
    from dpbias_utils.results import report

    profile = load_profile(paths.REPO_ROOT / "tests" / "profiles" / "tiny.yaml")
    before = report.methods_html(profile, tmp_path)
    assert "appears once stage 01 has run" in before
    node = tmp_path / paths.STAGE_DIRS["01"] / "node-a"
    node.mkdir(parents=True)
    share = lambda hits, n: {"n_sentences": n, "n_in_reference": hits, "share": hits / n}  # noqa: E731
    (node / "data.json").write_text(json.dumps({
        "privacy_unit": {"definition": "one chunk of at most 64 tokens of one text row", "corpus": "text",
                         "cda": "augment: a counterfactual row belongs to its original's unit", "n_units": 6135,
                         "n_distinct_texts": 6015, "max_repeats_of_a_text": 14,
                         "documents": {"definition": "a WikiText article", "n_documents": 60,
                                       "units_per_document": {"max": 509, "mean": 102.25}}},
        "overlap": {"splits": {"valid_in_train": share(246, 10548)},
                    "pretraining": {"source": "gpt2: not available", "status": "unknown", "train": "unknown"}}}))
    text = report.methods_html(profile, tmp_path)
    assert "N = 6,135 units, 6,015 distinct texts (a text at most 14 time(s))" in text
    assert "60 documents (a WikiText article), 102.2 units each on average, at most 509" in text
    assert "(kε, k e<sup>(k−1)ε</sup>δ)" in text and "valid in train 2.3 %" in text
    assert "overlap with the base's pretraining corpus unknown (gpt2: not available)" in text


def test_a_findings_page_shows_the_published_figures_in_the_report_s_order(tmp_path):
    folder, page = tmp_path / "figures" / "p", tmp_path / "docs" / "results" / "p.md"
    folder.mkdir(parents=True)
    for name in ("gradnorm_gap", "claims_forest"):
        (folder / f"{name}.png").write_bytes(b"png")
    body = readme.FindingsBlock("p-findings", folder / "findings.md", page).render("### Summary of verdicts\n")
    assert body.index("(../../figures/p/claims_forest.png)") < body.index("(../../figures/p/gradnorm_gap.png)")
    assert "*Figure 1.* Every claim of the study" in body and "learned_association" not in body
