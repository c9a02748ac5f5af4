"""Stage 05 carries the non-binary group: association rows and items, and stage 03's nonbinary split."""
import json

import numpy as np
import pandas as pd

from dpbias_utils import paths
from dpbias_utils.bias import association as A
from dpbias_utils.bias.evaluate import write_item_log
from dpbias_utils.results import claims, nonbinary, tables


def _blind_then_leaning(lean: float):
    """A scorer whose non-binary prompts put ``0.5 + lean`` on the female-stereotyped attributes while
    female / male prompts are gender-blind at 0.5: the pair lean is exactly ``lean``."""
    nonbinary = {p.nonbinary for p in A.association_prompts(n_names=2, nonbinary=True)}

    def scorer(prompts, conts):
        from dpbias_utils.data import corpus
        family = next(f for f, attrs in corpus.FAMILY_ATTRIBUTES.items() if conts[0].split()[-1] in attrs)
        female = np.array([corpus.FAMILY_ATTRIBUTES[family][c.split()[-1]] == "female" for c in conts])
        out = np.empty((len(prompts), len(conts)))
        for i, text in enumerate(prompts):
            p_f = 0.5 + lean if text in nonbinary else 0.5
            out[i] = np.log(np.where(female, p_f / female.sum(), (1 - p_f) / (~female).sum()))
        return out
    return scorer


def _node(root, stage, run_id, point):
    folder = root / f"{stage}-{run_id}"
    folder.mkdir()
    (folder / paths.CONTEXT_FILE).write_text(json.dumps({"point": point, "run_id": run_id}))
    return folder


def test_stage05_tables_carry_the_nonbinary_rows_and_items(tmp_path):
    upstream = {"03": [], "04": []}
    for seed, lean in ((0, 0.10), (1, 0.12)):
        point = {"epsilon": None, "seed": seed, "mixing_ratio": 0.0}
        per_pair = A.association_scores(A.association_prompts(n_names=2, nonbinary=True), _blind_then_leaning(lean))
        rows = A.association_rows(per_pair, {"occupation": 0.9, "sentiment": 0.8, "toxicity": 0.8}, n_boot=50, seed=0)
        f04 = _node(tmp_path, "04", f"nondp-s{seed}", point)
        pd.DataFrame(rows).drop(columns="planted").to_csv(f04 / "metrics.csv", index=False)
        write_item_log(f04, "association", per_pair)
        f03 = _node(tmp_path, "03", f"nondp-s{seed}", point)
        pd.DataFrame([{"run": "x", "checkpoint": "pct_100", "split": s, "measure": m, "value": v, "ci_low": v,
                       "ci_high": v, "n": 8}
                      for s in ("female", "male", "female-male", "nonbinary", "binary", "nonbinary-binary")
                      for m, v in (("l2_total", 1.0), ("clip_fraction", 0.5), ("misalignment_cos", 0.9))]
                     ).to_csv(f03 / "gradnorms.csv", index=False)
        upstream["03"].append(str(f03))
        upstream["04"].append(str(f04))
    t = tables.collect_tables(upstream, "tiny")
    res = t["results"]
    nb = res[(res["metric"] == "learned_association_sentiment") & (res["group"] == "nonbinary_lean")]
    assert sorted(nb["value"].round(12)) == [0.10, 0.12]
    assert set(res.loc[res["metric"] == "grad_misalignment_cos", "group"]) == {
        "female", "male", "diff", "nonbinary", "binary", "nonbinary-binary"}
    items = t["items"]
    assert set(items["group"]) == {"all", "nonbinary", "nonbinary_lean"}
    # the seed-resampled summary of the lean over the two runs, as the claims compute one
    res_lean = claims.arm_summary(items, "learned_association_occupation", group="nonbinary_lean")
    assert abs(res_lean.point - 0.11) < 1e-9 and res_lean.n_seeds[0] == 2
    res_an = claims.arm_summary(items, "learned_association_occupation", group="nonbinary")  # a_n = 0.5 + lean
    assert abs(res_an.point - 0.61) < 1e-9 and res_an.n_items == res_lean.n_items
    nb = nonbinary.association_table(items).set_index(["condition", "family", "measure"])["value"]
    assert abs(nb[("non-DP", "toxicity", "a_n")] - 0.61) < 1e-9 and abs(nb[("non-DP", "toxicity", "lean")] - 0.11) < 1e-9
    summary = tables.seed_summary(res)
    assert {"nonbinary", "nonbinary_lean"} <= set(summary["group"])
    assert not tables.association_summary(items).empty  # the figure's summary still reads group "all" only
    # the non-binary figure: the lean per family, the gradient norms of the two splits; never the base alone
    import matplotlib

    matplotlib.use("Agg")
    shown = nonbinary.fig_nonbinary(items, res, tmp_path / "figures")
    assert len(shown.panels) == 2 and shown.empty == [] and (tmp_path / "figures" / "nonbinary.png").is_file()
    base_only = items.assign(run_id="base")
    assert nonbinary.fig_nonbinary(base_only, res.iloc[:0], tmp_path / "f2") is None


def test_the_nonbinary_profile_switches_the_probe_on_and_the_default_does_not():
    from types import SimpleNamespace

    from dpbias_utils.params import load_profile
    from dpbias_utils.stages import s01_data, s04_bias

    nonbinary = load_profile(paths.PARAMS / "nonbinary.yaml")
    assert nonbinary.data.controlled.nonbinary_fraction == 0.2
    assert s04_bias.has_nonbinary(SimpleNamespace(profile=nonbinary))
    assert not s04_bias.has_nonbinary(SimpleNamespace(profile=load_profile(paths.DEFAULT_PARAMS)))
    frame = pd.DataFrame({"subject_gender": ["female", "nonbinary", "none", "nonbinary"]})
    assert s01_data._nonbinary_flags(frame, [3, 0, 1]) == [True, False, True]
    assert s01_data._nonbinary_flags(pd.DataFrame({"text": ["a"]}), [0]) is None  # real text: no flags
