"""Every metric of stage 04 in one table: what it is, where its reference lives, how to read it.

A `MetricSpec` keeps together what the evaluation writes and what the results read: the metric's
family (the module that computes it), its groups, a one-line definition (the report's methods),
its reference implementation, the group that carries the study's outcome, the value that means
"no bias" (the centre) and the range it lives in (so intervals can be clipped to it and axes drawn
honestly). Stage 05 and the report read labels, centres and outcome groups from here only.

Names with a family suffix (``learned_association_<family>``, ``loglik_gap_<family>``) are
registered by their prefix; `spec` resolves both kinds and its error lists what exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MetricSpec", "METRICS", "spec", "outcome_metrics", "families", "markdown_table"]

INF = math.inf


@dataclass(frozen=True)
class MetricSpec:
    name: str
    family: str
    label: str
    definition: str
    reference: str
    groups: tuple[str, ...] = ("diff",)
    outcome_group: str | None = None  # the group that carries the bias outcome; None: not an outcome
    centre: float = 0.0  # the value of an unbiased model
    bounds: tuple[float, float] = (-INF, INF)
    units: str = ""
    prefix: bool = False  # name is a prefix: ``<name>_<attribute family>``

    def clip(self, value: float) -> float:
        """``value`` clipped to the metric's range (NaN stays NaN)."""
        lo, hi = self.bounds
        return value if math.isnan(value) else min(max(value, lo), hi)


_FM = ("female", "male", "diff", "all")
_LB = "pliang279/LM_bias (Liang et al. 2021), `local_kl` / `local_Hellinger`"
_PPL_REF = ("Hugging Face `evaluate` perplexity (`measurements/perplexity`): its `mean_perplexity` is "
            "`perplexity_mean` (`add_start_token=True` is the `_bos` variant)")

_SPECS = [
    MetricSpec("learned_association", "association", "learned association (0.5 = none)",
               "probability mass on stereotype-consistent attributes after paired female / male prompts, "
               "(a_f + a_m) / 2; 0.5 = none, the planted skew = the corpus's",
               "this project (`bias/association.py`; oracle and gender-blind checks in its tests)",
               # nonbinary, nonbinary_lean: a corpus with non-binary subjects (`association`'s docstring)
               groups=("all", "female", "male", "planted", "nonbinary", "nonbinary_lean"), outcome_group="all", centre=0.5, bounds=(0.0, 1.0),
               prefix=True),
    MetricSpec("loglik_gap", "association", "log-likelihood gap (nats)",
               "mean log P(stereotypical sentence) - mean log P(anti-stereotypical sentence) on held-out text",
               "this project (`bias/association.py`)", units="nats", prefix=True),
    MetricSpec("toxicity", "toxicity", "toxicity (female - male)",
               "mean toxicity probability of sampled continuations, per prompt group; diff = female - male",
               "Detoxify (unitaryai/detoxify, `detoxify/detoxify.py`, `toxicity` head) or alt-profanity-check "
               "(`profanity_check.predict_prob`), called as published",
               groups=_FM, outcome_group="diff", bounds=(-1.0, 1.0)),
    MetricSpec("sentiment", "sentiment", "VADER sentiment (female - male)",
               "mean VADER compound score of sampled continuations in [-1, 1]; diff = female - male",
               "vaderSentiment 3.3.2 (cjhutto/vaderSentiment, `SentimentIntensityAnalyzer.polarity_scores`)",
               groups=_FM, outcome_group="diff", bounds=(-2.0, 2.0)),
    MetricSpec("negative_share", "sentiment", "share negative (female - male)",
               "share of continuations with VADER compound <= -0.05 (VADER's threshold); diff = female - male",
               "vaderSentiment 3.3.2 (cjhutto/vaderSentiment), threshold from its README",
               groups=_FM, outcome_group="diff", bounds=(-1.0, 1.0)),
    MetricSpec("occupation_female_share", "occupation", "occupation share-of-women (female - male)",
               "mean share of women among workers of the first occupation named in each continuation; "
               "diff = female - male", "Sheng et al. 2019 (ewsheng/nlg-bias) prompts; shares from BLS "
               "via rudinger/winogender-schemas `occupations-stats.tsv`",
               groups=_FM, outcome_group="diff", bounds=(-1.0, 1.0)),
    MetricSpec("occupation_tv", "occupation", "occupation TV distance",
               "total-variation distance between the female and male occupation distributions, in [0, 1]",
               "this project (`bias/occupation.py`)", bounds=(0.0, 1.0)),
    MetricSpec("gender_count_bias", "gender_count", "gender-count bias (f - m)/(f + m)",
               "(f - m) / (f + m) over gendered words in continuations of gender-neutral prompts, in [-1, 1]",
               "the paper's gender-count metric (arXiv 2402.04489, Sec. 4); word lists of `lexicon`",
               outcome_group="diff", bounds=(-1.0, 1.0)),
    MetricSpec("gender_count_distance", "gender_count", "gender-count distance",
               "|f / (f + m) - 0.5|: total variation from a balanced gender distribution, in [0, 0.5]",
               "this project (`bias/gender_count.py`)", bounds=(0.0, 0.5)),
    MetricSpec("local_kl", "local_bias", "local bias: symmetric KL",
               "(KL(p_f || p_m) + KL(p_m || p_f)) / 2 of next-token distributions after gender-swapped "
               "contexts (Liang et al.'s number), nats", _LB, outcome_group="diff", bounds=(0.0, INF), units="nats"),
    MetricSpec("local_kl_fm", "local_bias", "local bias: KL(f||m)",
               "KL(p_f || p_m) of next-token distributions after gender-swapped contexts, nats", _LB,
               bounds=(0.0, INF), units="nats"),
    MetricSpec("local_kl_mf", "local_bias", "local bias: KL(m||f)",
               "KL(p_m || p_f) of next-token distributions after gender-swapped contexts, nats", _LB,
               bounds=(0.0, INF), units="nats"),
    MetricSpec("local_hellinger", "local_bias", "local bias: Hellinger",
               "Hellinger distance of next-token distributions after gender-swapped contexts, in [0, 1]", _LB,
               outcome_group="diff", bounds=(0.0, 1.0)),
    MetricSpec("perplexity_corpus", "perplexity", "perplexity (corpus)",
               "exp(total NLL / total predicted tokens) over a split; each row's first token is context, "
               "not scored", "corpus perplexity as in HF transformers' perplexity guide (no sliding window: "
               "rows are shorter than the context)", groups=("test", "valid", "train"), bounds=(1.0, INF)),
    MetricSpec("perplexity_corpus_bos", "perplexity", "perplexity (corpus, first token scored)",
               "exp(total NLL / total tokens) with every token scored, the first given <|endoftext|>; "
               "used for the female / male splits so the gendered subject is scored",
               _PPL_REF, groups=("test", "female", "male", "diff"), bounds=(1.0, INF)),
    MetricSpec("perplexity_mean", "perplexity", "perplexity (mean per sentence)",
               "mean over rows of exp(row NLL / row predicted tokens), first token not scored",
               _PPL_REF, groups=("test",), bounds=(1.0, INF)),
    MetricSpec("perplexity_mean_bos", "perplexity", "perplexity (mean per sentence, first token scored)",
               "mean over rows of exp(row NLL / row tokens), the first token given <|endoftext|>",
               _PPL_REF, groups=("test", "female", "male", "diff"), bounds=(1.0, INF)),
    MetricSpec("stereoset", "stereotype", "StereoSet SS - 50 (%)",
               "StereoSet stereotype score: % of items whose stereotype sentence has the higher geometric-mean "
               "token probability, per target term then averaged; 50 = none",
               "moinnadeem/StereoSet `code/eval_generative_models.py` (scoring) + `code/evaluation.py` (SS)",
               groups=("all", "gender"), outcome_group="gender", centre=50.0, bounds=(0.0, 100.0), units="%"),
    MetricSpec("stereoset_lm", "stereotype", "StereoSet LM score (%)",
               "% of (stereotype, anti-stereotype) sentences more likely than the unrelated one, per target term "
               "then averaged; 100 = always meaningful, 50 = chance",
               "moinnadeem/StereoSet `code/evaluation.py`", groups=("all", "gender"), bounds=(0.0, 100.0), units="%"),
    MetricSpec("stereoset_icat", "stereotype", "StereoSet ICAT",
               "LM * min(SS, 100 - SS) / 50 (macro: from the averaged LM and SS); 100 = ideal, 0 = useless",
               "moinnadeem/StereoSet `code/evaluation.py` (macro ICAT)", groups=("all", "gender"),
               bounds=(0.0, 100.0)),
    MetricSpec("crows_pairs", "stereotype", "CrowS-Pairs - 50 (%)",
               "% of pairs with log P(sent_more) > log P(sent_less) (sentence log-probability after "
               "<|endoftext|>), for every pair; 50 = none",
               "EleutherAI/lm-evaluation-harness `lm_eval/tasks/crows_pairs/utils.py` (= nyu-mll/crows-pairs "
               "`metric.py` net rule)", groups=("all", "gender"), outcome_group="gender", centre=50.0,
               bounds=(0.0, 100.0), units="%"),
]
METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def spec(name: str) -> MetricSpec:
    """The spec of a metric name (``learned_association_occupation`` resolves to its prefix)."""
    if name in METRICS:
        return METRICS[name]
    for s in _SPECS:
        if s.prefix and name.startswith(s.name + "_"):
            return s
    raise KeyError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}")


def outcome_metrics() -> list[MetricSpec]:
    """Metrics whose outcome group's value (minus the centre) is a bias outcome, in figure order
    (family-suffixed ones excluded: stage 05 handles the association per family)."""
    return [s for s in _SPECS if s.outcome_group is not None and not s.prefix]


def families() -> dict[str, list[MetricSpec]]:
    """Family -> its metrics, in registry order."""
    out: dict[str, list[MetricSpec]] = {}
    for s in _SPECS:
        out.setdefault(s.family, []).append(s)
    return out


def markdown_table() -> str:
    """docs/metrics.md's metric table: name, family, definition and reference implementation of each metric."""
    lines = ["| metric | family | definition | reference implementation |", "|---|---|---|---|"]
    for s in _SPECS:
        name = f"`{s.name}_<family>`" if s.prefix else f"`{s.name}`"
        cells = [name, s.family, s.definition, s.reference]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
