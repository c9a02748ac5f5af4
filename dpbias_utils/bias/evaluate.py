"""Stage 04 in one call: every enabled bias metric of one model, as a tidy table and generations.

`evaluate_model` writes ``metrics.csv`` (columns ``metric, group, value, ci_low, ci_high, n``; one
row per metric and group) and ``generations.jsonl`` (one line per sampled continuation with its
prompt, group and scores), and returns the metrics table.

Metric names and groups (``diff`` = female - male, as in the paper's Table 1; metrics that are
themselves a female-vs-male contrast, such as the TV distances, count bias and local bias, have
only a ``diff`` row):

| metric | groups | definition (module) |
|---|---|---|
| ``learned_association_<family>`` | all, female, male, planted | probability mass on stereotype-consistent attributes after paired gendered prompts; 0.5 = none, ``planted`` = the corpus's skew (`association`) |
| ``loglik_gap_<family>`` | diff | mean log P(stereotypical) - mean log P(anti-stereotypical) held-out sentences, nats (`association`) |
| ``toxicity`` | female, male, diff, all | mean toxicity probability (`toxicity`) |
| ``sentiment`` | female, male, diff, all | mean VADER compound (`sentiment`) |
| ``negative_share`` | female, male, diff, all | share of compound <= -0.05 (`sentiment`) |
| ``occupation_female_share`` | female, male, diff, all | mean share of women in the named occupations (`occupation`) |
| ``occupation_tv`` | diff | TV distance of the female / male occupation distributions (`occupation`) |
| ``gender_count_bias`` | diff | (f - m) / (f + m) gendered words after neutral prompts (`gender_count`) |
| ``gender_count_distance`` | diff | TV distance of (f, m) / (f + m) from (0.5, 0.5) (`gender_count`) |
| ``local_kl``, ``local_kl_fm``, ``local_kl_mf``, ``local_hellinger`` | diff | next-token divergence of swapped contexts; ``local_kl`` = mean of the two directions (`local_bias`) |
| ``perplexity_corpus``, ``perplexity_mean`` | each split but female / male | token-weighted and per-row mean perplexity, first token not scored (`perplexity`) |
| ``perplexity_corpus_bos``, ``perplexity_mean_bos`` | female, male, diff (every split with ``perplexity_bos``) | the same with the first token scored after the start token (`perplexity`) |
| ``stereoset``, ``stereoset_lm``, ``stereoset_icat`` | all and each bias type | StereoSet SS, LM score and ICAT, per target term then averaged (`stereotype`) |
| ``crows_pairs`` | all and each bias type | % pairs with log P(sent_more) > log P(sent_less), 50 = none (`stereotype`) |

Every metric's one-line definition and reference implementation is in `registry.METRICS`.
Per-item logs beside ``metrics.csv``: ``generations.jsonl`` (each continuation with its toxicity,
sentiment, occupation and gender-word scores under ``scores``) and ``items/<log>.jsonl`` for the
other families (``association``, ``local_bias``, ``perplexity``, ``stereoset``, ``crows_pairs``),
one line per prompt pair, context pair, row, item or sentence pair.

Units of ``n`` and of the bootstrap: toxicity / sentiment / negative_share average the k samples of a
prompt first and resample prompts (samples of one prompt are not independent); occupation and
gender counts resample continuations; local bias resamples context pairs; perplexity resamples
sequences; CrowS-Pairs resamples pairs and StereoSet its target terms (the unit it averages). ``all`` pools every prompt, the neutral ones included.

``cfg`` keys (the defaults match `params.EvaluationParams`; unknown keys are an error):

* ``metrics`` (all families): any of ``association, toxicity, sentiment, occupation, gender_count,
  local_bias, perplexity, stereotype``. ``association`` needs the controlled corpus's vocabulary
  (its templates and attributes); ``association_names`` (8) is the number of first-name pairs
  beside the pronoun and noun subjects.
* ``prompt_sets`` (``["controlled"]``), ``bold_source`` (None: hub), ``max_prompts_per_group``
  (None): see `prompts.load_prompt_sets`.
* sampling: ``k`` (4), ``max_new_tokens`` (16), ``top_p`` (0.95), ``top_k`` (50),
  ``temperature`` (1.0), ``batch_size`` (32, also used for scoring, perplexity and log-probs).
* ``toxicity_backend`` (``"profanity"``), ``toxicity_checkpoint`` (None), ``toxicity_config_path``
  (None): see `toxicity.get_toxicity_scorer`.
* ``occupation_table`` (None: `lexicon.OCCUPATION_FEMALE_SHARE`; or a TSV/CSV path).
* ``local_bias_pairs`` (None: the female/male pairs of the loaded prompt sets; or a list of
  ``(female_context, male_context)``), ``local_bias_max_pairs`` (None: all).
* ``stereoset_source``, ``crows_pairs_source`` (None: controlled-corpus items; ``"hub"``; or a
  local file), ``stereotype_max_items`` (None: all; else a seeded subset of each source).
* ``perplexity_bos`` (False): also score every split's first token after <|endoftext|> (the
  ``_bos`` variants); the female / male splits always are.
* ``n_boot`` (1000): bootstrap resamples of every interval. ``progress`` (True): tqdm bars.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..stats import TIDY_COLUMNS, bootstrap_ci, bootstrap_diff_ci, tidy_row
from . import association, gender_count, local_bias, occupation, sentiment, stereotype
from .generation import generate
from .perplexity import GENDER_SPLITS, perplexity, perplexity_rows, token_nll
from .prompts import load_prompt_sets
from .toxicity import get_toxicity_scorer

__all__ = ["METRIC_FAMILIES", "DEFAULT_CFG", "resolve_cfg", "evaluate_model"]

METRIC_FAMILIES = ("association", "toxicity", "sentiment", "occupation", "gender_count", "local_bias", "perplexity", "stereotype")
DEFAULT_CFG: dict[str, Any] = {
    "metrics": list(METRIC_FAMILIES),
    "prompt_sets": ["controlled"],
    "bold_source": None,
    "max_prompts_per_group": None,
    "k": 4,
    "max_new_tokens": 16,
    "top_p": 0.95,
    "top_k": 50,
    "temperature": 1.0,
    "batch_size": 32,
    "toxicity_backend": "profanity",
    "toxicity_checkpoint": None,
    "toxicity_config_path": None,
    "occupation_table": None,
    "local_bias_pairs": None,
    "local_bias_max_pairs": None,
    "stereoset_source": None,
    "crows_pairs_source": None,
    "stereotype_max_items": None,
    "association_names": 8,
    "perplexity_bos": False,
    "n_boot": 1000,
    "progress": True,
}
_GENERATION_FAMILIES = {"toxicity", "sentiment", "occupation", "gender_count"}


def resolve_cfg(cfg: dict | None) -> dict:
    """``cfg`` over `DEFAULT_CFG`; unknown keys or metric families raise a ValueError."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_CFG))
    if unknown:
        raise ValueError(f"unknown evaluation key(s) {unknown}; allowed: {', '.join(DEFAULT_CFG)}")
    out = {**DEFAULT_CFG, **cfg}
    bad = [m for m in out["metrics"] if m not in METRIC_FAMILIES]
    if bad:
        raise ValueError(f"unknown metric family(ies) {bad}; allowed: {', '.join(METRIC_FAMILIES)}")
    return out


def _group_rows(metric: str, values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    f, m = values[groups == "female"], values[groups == "male"]
    return [
        tidy_row(metric, "female", bootstrap_ci(f, n_boot=n_boot, seed=seed), len(f)),
        tidy_row(metric, "male", bootstrap_ci(m, n_boot=n_boot, seed=seed), len(m)),
        tidy_row(metric, "diff", bootstrap_diff_ci(f, m, n_boot=n_boot, seed=seed), len(f) + len(m)),
        tidy_row(metric, "all", bootstrap_ci(values, n_boot=n_boot, seed=seed), len(values)),
    ]


def _per_prompt_rows(metric: str, gens: pd.DataFrame, column: str, n_boot: int, seed: int) -> list[dict]:
    """Average the k samples of each prompt, then bootstrap over prompts."""
    per_prompt = gens.groupby("prompt_id", sort=False).agg(group=("group", "first"), value=(column, "mean"))
    return _group_rows(metric, per_prompt["value"].to_numpy(float), per_prompt["group"].to_numpy(), n_boot, seed)


def _subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or len(df) <= n:
        return df
    idx = np.sort(np.random.default_rng(seed).permutation(len(df))[:n])
    return df.iloc[idx].reset_index(drop=True)


def _default_pairs(prompts: pd.DataFrame) -> list[tuple[str, str]]:
    paired = prompts[prompts["pair_id"].notna() & prompts["group"].isin(["female", "male"])]
    wide = paired.pivot_table(index="pair_id", columns="group", values="prompt", aggfunc="first", sort=False)
    wide = wide.dropna(subset=[c for c in ("female", "male") if c in wide.columns])
    if not {"female", "male"} <= set(wide.columns):
        return []
    return list(zip(wide["female"], wide["male"]))


def _json_value(v):
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def association_metrics(model, tokenizer, test: pd.DataFrame | None, cfg: dict, planted: dict[str, float] | None,
                        seed: int) -> tuple[list[dict], pd.DataFrame]:
    """The ``association`` family: learned association per attribute family (with the planted skew as
    group ``planted``) and, when ``test`` has stereotype labels, the held-out log-likelihood gap.
    Returns (tidy rows, per-pair log)."""
    n_boot, bs = int(cfg["n_boot"]), int(cfg["batch_size"])
    prompts = association.association_prompts(n_names=int(cfg["association_names"]), seed=0)
    per_pair = association.association_scores(prompts, association.model_scorer(model, tokenizer, max(bs, 256)))
    rows = association.association_rows(per_pair, planted, n_boot, seed)
    for family, skew in (planted or {}).items():
        rows.append(tidy_row(f"learned_association_{family}", "planted", (skew, skew, skew), 0))
    if test is not None and "label" in test.columns and test["label"].isin(["stereotypical", "anti-stereotypical"]).any():
        sentences = test.assign(family=association.family_of(test["text"]))
        nll, _ = token_nll(model, [list(ids) for ids in test["input_ids"]], bs, _pad_id(tokenizer))
        rows += association.loglik_gap_rows(sentences, -nll, n_boot, seed)
    return rows, per_pair


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def write_item_log(out_dir: Path, name: str, table: pd.DataFrame) -> Path:
    """``items/<name>.jsonl``: one JSON object per row of a per-item table (NaN written as null)."""
    folder = Path(out_dir) / "items"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for rec in table.to_dict("records"):
            fh.write(json.dumps({k: _json_value(v) for k, v in rec.items()}, ensure_ascii=False) + "\n")
    return path


def local_bias_metrics(model, tokenizer, prompts, cfg: dict, seed: int) -> tuple[list[dict], pd.DataFrame]:
    """The ``local_bias`` family: rows of the four divergences and the per-pair log."""
    pairs = [tuple(p) for p in cfg["local_bias_pairs"]] if cfg["local_bias_pairs"] is not None else _default_pairs(prompts)
    if cfg["local_bias_max_pairs"] is not None and len(pairs) > cfg["local_bias_max_pairs"]:
        keep = np.sort(np.random.default_rng(seed).permutation(len(pairs))[: cfg["local_bias_max_pairs"]])
        pairs = [pairs[i] for i in keep]
    scores = local_bias.local_bias_scores(model, tokenizer, pairs, int(cfg["batch_size"]))
    n_boot = int(cfg["n_boot"])
    rows = [tidy_row(metric, "diff", bootstrap_ci(scores[key], n_boot=n_boot, seed=seed), len(scores[key]))
            for metric, key in (("local_kl", "kl"), ("local_kl_fm", "kl_fm"), ("local_kl_mf", "kl_mf"),
                                ("local_hellinger", "hellinger"))]
    log = pd.DataFrame({"female_context": [f for f, _ in pairs], "male_context": [m for _, m in pairs],
                        **{key: scores[key] for key in ("kl", "kl_fm", "kl_mf", "hellinger")}})
    return rows, log


def perplexity_metrics(model, tokenizer, splits: dict[str, pd.DataFrame], cfg: dict, seed: int) -> tuple[list[dict], pd.DataFrame]:
    """The ``perplexity`` family: corpus and per-row mean perplexity of every split (the female / male
    splits, and every split with ``perplexity_bos``, scored from the start token) and the per-row log."""
    bs, n_boot = int(cfg["batch_size"]), int(cfg["n_boot"])
    results, logs = [], []
    for name, df in splits.items():
        variants = [True] if name in GENDER_SPLITS else ([False, True] if cfg["perplexity_bos"] else [False])
        for bos in variants:
            r = perplexity(model, df, tokenizer, batch_size=bs, n_boot=n_boot, seed=seed, start_token=bos)
            results.append((name, r))
            logs.append(r.per_sequence.assign(split=name, row=np.arange(len(r.per_sequence)), start_token=bos))
    log = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=["split", "row", "start_token"])
    return perplexity_rows(results, n_boot, seed), log


def stereotype_metrics(model, tokenizer, cfg: dict, seed: int) -> tuple[list[dict], dict[str, pd.DataFrame]]:
    """The ``stereotype`` family: StereoSet (SS, LM, ICAT) and CrowS-Pairs rows and their per-item logs."""
    bs, n_boot = int(cfg["batch_size"]), int(cfg["n_boot"])
    items = _subsample(stereotype.load_stereoset(cfg["stereoset_source"]), cfg["stereotype_max_items"], seed)
    per_item = stereotype.stereoset_items(model, tokenizer, items, bs)
    pairs = _subsample(stereotype.load_crows_pairs(cfg["crows_pairs_source"]), cfg["stereotype_max_items"], seed)
    per_pair = stereotype.crows_pairs_items(model, tokenizer, pairs, bs)
    rows = stereotype.stereoset_rows(per_item, n_boot, seed) + stereotype.crows_pairs_rows(per_pair, n_boot, seed)
    return rows, {"stereoset": per_item, "crows_pairs": per_pair}


def evaluate_model(model, tokenizer, splits: dict[str, pd.DataFrame], cfg: dict, out_dir: Path, seed: int,
                   planted: dict[str, float] | None = None) -> pd.DataFrame:
    """Run the enabled metric families on ``model``; write metrics.csv, generations.jsonl and the
    per-item logs ``items/<family>.jsonl`` to ``out_dir``. ``planted``: the
    corpus's skew per attribute family, recorded beside the learned association."""
    from ..progress import tqdm

    cfg = resolve_cfg(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enabled = [m for m in METRIC_FAMILIES if m in cfg["metrics"]]
    n_boot, bs, show = int(cfg["n_boot"]), int(cfg["batch_size"]), bool(cfg["progress"])
    device = next(model.parameters()).device
    rows: list[dict] = []
    item_logs: dict[str, pd.DataFrame] = {}
    gens = pd.DataFrame(columns=["prompt_id", "prompt", "group", "set", "family", "sample", "continuation"])

    needs_prompts = bool(_GENERATION_FAMILIES & set(enabled)) or ("local_bias" in enabled and cfg["local_bias_pairs"] is None)
    prompts = (
        load_prompt_sets(cfg["prompt_sets"], cfg["bold_source"], cfg["max_prompts_per_group"], seed=seed)
        if needs_prompts
        else None
    )
    bar = tqdm(total=len(enabled) + (1 if _GENERATION_FAMILIES & set(enabled) else 0), desc="bias metrics", disable=not show)

    if "association" in enabled:
        bar.set_postfix_str("learned association")
        assoc_rows, item_logs["association"] = association_metrics(model, tokenizer, splits.get("test"), cfg, planted, seed)
        rows += assoc_rows
        bar.update(1)

    if _GENERATION_FAMILIES & set(enabled):
        bar.set_postfix_str("generation")
        texts = generate(
            model, tokenizer, list(prompts["prompt"]), k=int(cfg["k"]), max_new_tokens=int(cfg["max_new_tokens"]),
            top_p=float(cfg["top_p"]), top_k=int(cfg["top_k"]), temperature=float(cfg["temperature"]),
            seed=seed, batch_size=bs, prompt_ids=list(prompts["prompt_id"]), progress=show,
        )
        records = [
            {**{c: p[c] for c in ("prompt_id", "prompt", "group", "set", "family")}, "sample": j, "continuation": t}
            for p, conts in zip(prompts.to_dict("records"), texts)
            for j, t in enumerate(conts)
        ]
        gens = pd.DataFrame(records, columns=gens.columns)
        bar.update(1)
    conts = list(gens["continuation"])

    if "toxicity" in enabled:
        bar.set_postfix_str("toxicity")
        scorer = get_toxicity_scorer(
            cfg["toxicity_backend"], cfg["toxicity_checkpoint"], device="cuda" if device.type == "cuda" else "cpu",
            config_path=cfg["toxicity_config_path"], batch_size=bs,
        )
        gens["toxicity"] = scorer(conts) if conts else np.zeros(0)
        rows += _per_prompt_rows("toxicity", gens, "toxicity", n_boot, seed)
        bar.update(1)

    if "sentiment" in enabled:
        bar.set_postfix_str("sentiment")
        gens["sentiment"] = sentiment.compound_scores(conts)
        gens["negative"] = sentiment.negative_flags(gens["sentiment"].to_numpy(float))
        rows += _per_prompt_rows("sentiment", gens, "sentiment", n_boot, seed)
        rows += _per_prompt_rows("negative_share", gens, "negative", n_boot, seed)
        bar.update(1)

    if "occupation" in enabled:
        bar.set_postfix_str("occupation")
        occ = gens["family"] == "occupation"
        sub = gens[occ]
        occ_rows, per = occupation.occupation_rows(
            list(sub.loc[sub["group"] == "female", "continuation"]),
            list(sub.loc[sub["group"] == "male", "continuation"]),
            cfg["occupation_table"], n_boot, seed,
        )
        rows += occ_rows
        order = np.concatenate([np.flatnonzero(occ & (gens["group"] == "female")), np.flatnonzero(occ & (gens["group"] == "male"))])
        gens["occupation"] = None
        gens["occupation_share"] = np.nan
        gens.loc[gens.index[order], "occupation"] = per["occupation"].to_numpy(object)
        gens.loc[gens.index[order], "occupation_share"] = per["share"].to_numpy(float)
        bar.update(1)

    if "gender_count" in enabled:
        bar.set_postfix_str("gender counts")
        counts = gender_count.gender_counts(conts)
        gens["female_words"], gens["male_words"] = counts[:, 0], counts[:, 1]
        neutral = counts[(gens["group"] == "neutral").to_numpy()]
        for metric, stat in (("gender_count_bias", gender_count.count_bias), ("gender_count_distance", gender_count.count_distance)):
            ci = bootstrap_ci(neutral, stat, n_boot, seed=seed) if neutral.sum() > 0 else (float("nan"),) * 3
            rows.append(tidy_row(metric, "diff", ci, len(neutral)))
        bar.update(1)

    if "local_bias" in enabled:
        bar.set_postfix_str("local bias")
        lb_rows, item_logs["local_bias"] = local_bias_metrics(model, tokenizer, prompts, cfg, seed)
        rows += lb_rows
        bar.update(1)

    if "perplexity" in enabled:
        bar.set_postfix_str("perplexity")
        ppl_rows, item_logs["perplexity"] = perplexity_metrics(model, tokenizer, splits, cfg, seed)
        rows += ppl_rows
        bar.update(1)

    if "stereotype" in enabled:
        bar.set_postfix_str("stereotype")
        st_rows, st_logs = stereotype_metrics(model, tokenizer, cfg, seed)
        rows += st_rows
        item_logs.update(st_logs)
        bar.update(1)
    bar.close()

    metrics = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    metrics.to_csv(out_dir / "metrics.csv", index=False)
    for name, table in item_logs.items():
        write_item_log(out_dir, name, table)
    score_cols = [c for c in gens.columns if c not in ("prompt_id", "prompt", "group", "set", "family", "sample", "continuation")]
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as fh:
        for rec in gens.to_dict("records"):
            line = {k: _json_value(rec[k]) for k in ("prompt_id", "prompt", "group", "set", "family", "sample", "continuation")}
            line["scores"] = {c: _json_value(rec[c]) for c in score_cols}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return metrics
