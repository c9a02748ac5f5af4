import json
import time

import numpy as np
import pandas as pd
import pytest

from dpbias_utils.bias import evaluate

EXPECTED = {
    **{f"learned_association_{f}": {"all", "female", "male"} for f in ("occupation", "sentiment", "toxicity")},
    "toxicity": {"female", "male", "diff", "all"},
    "sentiment": {"female", "male", "diff", "all"},
    "negative_share": {"female", "male", "diff", "all"},
    "occupation_female_share": {"female", "male", "diff", "all"},
    "occupation_tv": {"diff"},
    "gender_count_bias": {"diff"},
    "gender_count_distance": {"diff"},
    "local_kl": {"diff"},
    "local_kl_fm": {"diff"},
    "local_kl_mf": {"diff"},
    "local_hellinger": {"diff"},
    "perplexity_corpus": {"test"},
    "perplexity_mean": {"test"},
    "perplexity_corpus_bos": {"female", "male", "diff"},
    "perplexity_mean_bos": {"female", "male", "diff"},
    "stereoset": {"all", "gender"},
    "stereoset_lm": {"all", "gender"},
    "stereoset_icat": {"all", "gender"},
    "crows_pairs": {"all", "gender"},
}


def _split(tok, texts):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return pd.DataFrame({"input_ids": ids, "n_tokens": [len(i) for i in ids]})


def test_end_to_end_tiny(tiny_model, tiny_tokenizer, tmp_path):
    splits = {
        "test": _split(tiny_tokenizer, ["The woman worked as a nurse .", "He was rude .", "The train was old ."]),
        "female": _split(tiny_tokenizer, ["She worked as a nurse .", "My mother was kind ."]),
        "male": _split(tiny_tokenizer, ["He worked as a pilot .", "My father was rude ."]),
    }
    cfg = {"k": 3, "max_new_tokens": 8, "max_prompts_per_group": 4, "batch_size": 64, "n_boot": 50,
           "stereotype_max_items": 24, "progress": False}
    t = time.perf_counter()
    metrics = evaluate.evaluate_model(tiny_model, tiny_tokenizer, splits, cfg, tmp_path / "out", seed=0)
    assert time.perf_counter() - t < 30
    got = metrics.groupby("metric")["group"].apply(set).to_dict()
    assert got == EXPECTED
    assert list(metrics.columns) == ["metric", "group", "value", "ci_low", "ci_high", "n"]
    # the word-level tiny model names occupations and gendered words, so every metric is defined
    assert metrics["value"].notna().all(), metrics[metrics["value"].isna()]
    ok = metrics.dropna(subset=["ci_low"])
    assert ((ok["ci_low"] <= ok["value"] + 1e-9) & (ok["value"] <= ok["ci_high"] + 1e-9)).all()
    on_disk = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert len(on_disk) == len(metrics)
    lines = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    # 4 pairs x 2 families x 2 groups + 4 neutral prompts, k = 3 each
    assert len(lines) == (4 * 2 * 2 + 4) * 3
    assert {"toxicity", "sentiment", "occupation", "female_words"} <= set(lines[0]["scores"])
    diff = metrics[(metrics["metric"] == "toxicity")].set_index("group")["value"]
    assert diff["diff"] == pytest.approx(diff["female"] - diff["male"])
    # every other family keeps a per-item log from which its aggregate is recomputed
    logs = {p.stem: pd.read_json(p, lines=True) for p in (tmp_path / "out" / "items").glob("*.jsonl")}
    assert set(logs) == {"association", "local_bias", "perplexity", "stereoset", "crows_pairs"}
    value = metrics.set_index(["metric", "group"])["value"]
    assert 100 * logs["crows_pairs"]["stereotypical"].mean() == pytest.approx(value["crows_pairs", "all"])
    assert logs["local_bias"]["kl"].mean() == pytest.approx(value["local_kl", "diff"])
    assert logs["local_bias"]["kl"].to_numpy() == pytest.approx(
        (logs["local_bias"]["kl_fm"] + logs["local_bias"]["kl_mf"]).to_numpy() / 2)
    ppl = logs["perplexity"]
    test_rows = ppl[(ppl["split"] == "test") & ~ppl["start_token"]]
    assert np.exp(test_rows["nll_sum"].sum() / test_rows["n_predicted"].sum()) == pytest.approx(
        value["perplexity_corpus", "test"])
    female = ppl[ppl["split"] == "female"]
    assert female["start_token"].all() and (female["n_predicted"] == splits["female"]["n_tokens"].to_numpy()).all()
    per_term = logs["stereoset"].groupby("target")["pro"].mean()
    assert 100 * per_term.mean() == pytest.approx(value["stereoset", "all"])


def test_cfg_errors_and_subset(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation key"):
        evaluate.resolve_cfg({"topp": 0.9})
    with pytest.raises(ValueError, match="allowed: association, toxicity, sentiment"):
        evaluate.resolve_cfg({"metrics": ["regard"]})
    m = evaluate.evaluate_model(
        tiny_model, tiny_tokenizer, {}, {"metrics": ["local_bias"], "progress": False, "n_boot": 20,
                                         "local_bias_pairs": [("She was", "He was")]}, tmp_path, seed=1,
    )
    assert set(m["metric"]) == {"local_kl", "local_kl_fm", "local_kl_mf", "local_hellinger"} and (m["n"] == 1).all()
    assert (tmp_path / "generations.jsonl").read_text() == ""


def test_defaults_match_the_profile_schema():
    params = pytest.importorskip("dpbias_utils.params")
    dumped = params.EvaluationParams().model_dump()
    resolved = evaluate.resolve_cfg(dumped)
    assert {k: resolved[k] for k in dumped} == {k: evaluate.DEFAULT_CFG[k] for k in dumped}


def test_association_family_records_planted_skew_and_loglik_gap(tiny_model, tiny_tokenizer, tmp_path):
    texts = ["She worked as a nurse .", "He worked as a nurse .", "She was very rude .", "He was very rude .",
             "Someone online called her stupid .", "Someone online called him stupid ."]
    test = _split(tiny_tokenizer, texts).assign(
        text=texts, label=["stereotypical", "anti-stereotypical"] * 3)
    cfg = {"metrics": ["association"], "n_boot": 20, "progress": False, "association_names": 2}
    m = evaluate.evaluate_model(tiny_model, tiny_tokenizer, {"test": test}, cfg, tmp_path, seed=0,
                                planted={"occupation": 0.9, "sentiment": 0.8, "toxicity": 0.8})
    occ = m[m["metric"] == "learned_association_occupation"].set_index("group")
    assert occ.loc["planted", "value"] == 0.9 and 0 < occ.loc["all", "value"] < 1
    assert {"loglik_gap_occupation", "loglik_gap_sentiment", "loglik_gap_toxicity"} <= set(m["metric"])
    assert (m.loc[m["metric"].str.startswith("loglik_gap"), "n"] == 2).all()
    per_pair = pd.read_json(tmp_path / "items" / "association.jsonl", lines=True)
    assert len(per_pair) == m.loc[(m["metric"].str.startswith("learned_association")) & (m["group"] == "all"), "n"].sum()


def test_a_late_family_failure_keeps_the_metrics_computed_before_it(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    # stage 04 on the hub: StereoSet / CrowS-Pairs come last and a download can fail there; the
    # families done before are on disk (metrics.csv, item logs) when the error propagates
    from dpbias_utils.bias import stereotype

    def fail(ctx):
        raise RuntimeError("download failed")

    monkeypatch.setattr(stereotype, "evaluate", fail)
    cfg = {"metrics": ["local_bias", "stereotype"], "progress": False, "n_boot": 20,
           "local_bias_pairs": [("She was", "He was")]}
    with pytest.raises(RuntimeError, match="download failed"):
        evaluate.evaluate_model(tiny_model, tiny_tokenizer, {}, cfg, tmp_path, seed=1)
    done = pd.read_csv(tmp_path / "metrics.csv")
    assert set(done["metric"]) == {"local_kl", "local_kl_fm", "local_kl_mf", "local_hellinger"}
