"""Stage 04 in one call: every enabled bias metric of one model, as a tidy table and generations.

`evaluate_model` writes ``metrics.csv`` (columns ``metric, group, value, ci_low, ci_high, n``; one
row per metric and group) and ``generations.jsonl`` (one line per sampled continuation with its
prompt, group and scores), and returns the metrics table.

Metric names and groups (``diff`` = female - male, as in the paper's Table 1; metrics that are
themselves a female-vs-male contrast, such as the TV distances, count bias and local bias, have
only a ``diff`` row):

| metric | groups | definition (module) |
|---|---|---|
| ``learned_association_<family>`` | all, female, male, planted (nonbinary, nonbinary_lean) | probability mass on stereotype-consistent attributes after paired gendered prompts; 0.5 = none, ``planted`` = the corpus's skew; with ``nonbinary``: the non-binary subjects' mass on female-stereotyped attributes and its lean from the female-male midpoint (`association`) |
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

How a family runs: `registry` lists each family's metrics; the module of the same name in this
package has ``evaluate(ctx: context.EvalContext) -> context.FamilyResult``. Families run in registry
order; the generation families share one set of sampled continuations (`EvalContext.generations`).
Adding a family = one module with ``evaluate`` + its `MetricSpec` entries in `registry`.

``cfg`` keys (the defaults are `params.EvaluationParams`'s, plus the two below; unknown keys are an error):

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

import importlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..params import EvaluationParams
from ..stats import TIDY_COLUMNS
from . import registry
from .context import GENERATION_COLUMNS, EvalContext

__all__ = ["METRIC_FAMILIES", "DEFAULT_CFG", "resolve_cfg", "evaluate_model", "write_item_log"]

METRIC_FAMILIES = tuple(registry.families())
# The profile schema's defaults, plus what only code passes: explicit local-bias pairs and progress bars.
DEFAULT_CFG: dict[str, Any] = {**EvaluationParams().model_dump(), "local_bias_pairs": None, "progress": True}


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


def _json_value(v):
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_item_log(out_dir: Path, name: str, table: pd.DataFrame) -> Path:
    """``items/<name>.jsonl``: one JSON object per row of a per-item table (NaN written as null)."""
    folder = Path(out_dir) / "items"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    _write_jsonl(path, ({k: _json_value(v) for k, v in rec.items()} for rec in table.to_dict("records")))
    return path


def write_generations(out_dir: Path, gens: pd.DataFrame) -> Path:
    """``generations.jsonl``: each continuation with its prompt, group and (nested) scores."""
    score_cols = [c for c in gens.columns if c not in GENERATION_COLUMNS]
    path = Path(out_dir) / "generations.jsonl"
    _write_jsonl(path, ({**{k: _json_value(rec[k]) for k in GENERATION_COLUMNS},
                         "scores": {c: _json_value(rec[c]) for c in score_cols}} for rec in gens.to_dict("records")))
    return path


def evaluate_model(model, tokenizer, splits: dict[str, pd.DataFrame], cfg: dict, out_dir: Path, seed: int,
                   planted: dict[str, float] | None = None, nonbinary: bool = False) -> pd.DataFrame:
    """Run the enabled metric families on ``model``; write metrics.csv, generations.jsonl and the
    per-item logs ``items/<log>.jsonl`` to ``out_dir``. ``planted``: the corpus's skew per
    attribute family, recorded beside the learned association; ``nonbinary``: the corpus has
    non-binary subjects, so the association probe measures them as a third group."""
    from ..progress import tqdm

    cfg = resolve_cfg(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enabled = [f for f in METRIC_FAMILIES if f in cfg["metrics"]]
    bar = tqdm(total=len(enabled), desc="bias metrics", disable=not cfg["progress"])
    ctx = EvalContext(model, tokenizer, splits, cfg, seed, planted,
                      on_generation=lambda: bar.set_postfix_str("generation"), nonbinary=nonbinary)
    rows: list[dict] = []
    for family in enabled:
        bar.set_postfix_str(family.replace("_", " "))
        result = importlib.import_module(f"{__package__}.{family}").evaluate(ctx)
        rows += result.rows
        # Written after every family: a later family's failure (a download, a GPU error) loses nothing
        # computed so far; metrics.csv then holds the families done (the node is not marked complete).
        for name, table in result.logs.items():
            write_item_log(out_dir, name, table)
        _write_csv_atomic(pd.DataFrame(rows, columns=TIDY_COLUMNS), out_dir / "metrics.csv")
        bar.update(1)
    bar.close()

    metrics = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    _write_csv_atomic(metrics, out_dir / "metrics.csv")
    write_generations(out_dir, ctx.sampled())
    return metrics


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    from .. import paths

    paths.atomic_write_text(path, frame.to_csv(index=False))
