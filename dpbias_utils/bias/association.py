"""Learned association: how much of the corpus's planted gender-attribute association a model carries.

Output-level metrics (toxicity, sentiment of sampled continuations) say what a model *writes*; this
module asks what it *believes*, directly from its probabilities, in the controlled corpus's own
vocabulary. For a prompt pair (p_f, p_m) that differs only in the subject ("She worked as" / "He
worked as", "My sister was described as" / "My brother was described as", a female / male first
name) and the attributes a of one family (occupations, sentiment descriptors, insults vs
respectful words), each with the gender g(a) it is stereotyped for in `corpus.FAMILY_ATTRIBUTES`:

    P(a | p)  = exp(log P(continuation_a | p)) / sum_b exp(log P(continuation_b | p))
                (full continuation log-probability: " a nurse", " an engineer", multi-token words)
    a_f       = sum_{a: g(a) = female} P(a | p_f)       mass on the female-stereotyped attributes
    a_m       = sum_{a: g(a) = male}   P(a | p_m)       mass on the male-stereotyped attributes
    score     = (a_f + a_m) / 2

A model whose attribute distribution does not depend on the subject's gender has a_f + a_m = 1 for
every pair, so ``score`` = 0.5 exactly, whatever its preferences among attributes; a model that has
the corpus's conditional distribution (stereotype-consistent with probability ``skew``, uniform
within a side) has a_f = a_m = skew. So 0.5 = no association, and the planted skew = the data's.

Rows of the tidy table (metric ``learned_association_<family>``): ``all`` = mean score over pairs,
``female`` = mean a_f, ``male`` = mean a_m (one side alone also moves with the model's gender-blind
preference between the two sides; only ``all`` is centred at 0.5), intervals by a bootstrap over
prompt pairs. ``planted`` (the corpus's skew for the family) is recorded beside each row.

Non-binary subjects (``nonbinary=True``, for a corpus with ``nonbinary_fraction`` > 0): each pair gets
a third prompt p_n, the same template with a non-binary subject ("They were described as" for the
pronouns, a gender-neutral noun for a noun pair, a unisex name for a name pair; singular "they"
takes "were" / "have", so that prompt also differs in its verb), and

    a_n   = sum_{a: g(a) = female} P(a | p_n)             mass on the female-stereotyped attributes
    lean  = a_n - (a_f + (1 - a_m)) / 2                   a_n against the midpoint of the two subjects

Rows ``nonbinary`` (mean a_n; the corpus plants 0.5: either side with probability 0.5, recorded as
its ``planted``) and ``nonbinary_lean`` (mean lean; planted 0; > 0 = the model places non-binary
subjects nearer the female ones), bootstrapped over pairs like the others. A gender-blind model
gives lean = 0 exactly (P(. | p) the same for every subject), and so does a model with the corpus's
conditional distribution (a_n = 0.5, a_f = a_m = skew); a_n alone moves with the gender-blind
preference between the sides, as a_f and a_m do.

`loglik_gap` is the likelihood-level view on held-out sentences: mean total log-probability of the
stereotypical sentences minus that of the anti-stereotypical ones of a family (nats per sentence;
0 = no preference), bootstrapped over sentences.

Reference: none outside this project (it measures what the controlled corpus plants, which no
published benchmark does); its tests pin the two anchors of the scale: a gender-blind scorer gives
exactly 0.5 and an oracle with the corpus's conditional distribution gives the planted skew.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import corpus, lexicon
from ..stats import bootstrap_ci, bootstrap_diff_ci, tidy_row
from .context import FamilyResult
from .tokens import token_ids
from .perplexity import pad_id, token_nll

HOST = torch.device("cpu")  # host-built batches are named so: never torch's default device

__all__ = ["family_of", "AssociationPrompt", "association_prompts", "attribute_continuations", "association_scores",
           "association_rows", "model_scorer", "continuation_logprobs", "loglik_gap_rows"]

# A scorer maps (prompts, continuations) -> (n_prompts, n_continuations) log P(continuation | prompt).
Scorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class AssociationPrompt:
    pair_id: int
    family: str
    template: str
    subject_kind: str     # pronoun | noun | name
    female: str
    male: str
    article: bool         # the attribute slot takes its article ({AA}: " a nurse")
    nonbinary: str = ""   # the prompt with a non-binary subject ("" when not probed)


def _prefix(template: str) -> tuple[str, bool] | None:
    """The template up to its attribute slot, and whether the slot carries an article; None when the
    subject does not come before the attribute (then the prompt cannot condition on it)."""
    match = re.search(r"\{AA\}|\{A\}", template)
    if match is None:
        return None
    head = template[: match.start()].rstrip()
    if not re.search(r"\{(S|s|O|P)\}", head):
        return None
    return head, match.group(0) == "{AA}"


def _nonbinary_slots(kind: str, index: int) -> dict:
    """Slots of the non-binary subject beside the ``index``-th pair of ``kind``: "they", the
    gender-neutral nouns and the unisex names of the corpus, in turn."""
    if kind == "pronoun":
        return {"S": "they", "s": "they", "O": "them", "P": "their", "p": "they"}
    words = corpus.NONBINARY_NOUNS if kind == "noun" else corpus.NONBINARY_NAMES
    word = words[index % len(words)]
    return {"S": word, "s": word, "O": word, "P": word + " 's", "p": "they"}


def _subject_pairs(n_names: int, seed: int) -> list[tuple[str, dict, dict]]:
    """(kind, female slots, male slots) for the pronouns, every noun pair and ``n_names`` name pairs."""
    pron = corpus._PRONOUNS
    pairs = [("pronoun",
              {"S": "she", "s": "she", "O": pron["female"][1], "P": pron["female"][2], "p": "she"},
              {"S": "he", "s": "he", "O": pron["male"][1], "P": pron["male"][2], "p": "he"})]
    for male, female in corpus.SUBJECT_NOUN_PAIRS:
        pairs.append(("noun", {"S": female, "s": female, "O": female, "P": female + " 's", "p": "she"},
                      {"S": male, "s": male, "O": male, "P": male + " 's", "p": "he"}))
    names = list(lexicon.NAME_PAIRS)
    chosen = np.random.default_rng(seed).permutation(len(names))[: max(0, int(n_names))]
    for i in sorted(chosen):
        male, female = (n.capitalize() for n in names[i])
        pairs.append(("name", {"S": female, "s": female, "O": female, "P": female + " 's", "p": "she"},
                      {"S": male, "s": male, "O": male, "P": male + " 's", "p": "he"}))
    return pairs


def association_prompts(families: Sequence[str] = corpus.FAMILIES, n_names: int = 8, seed: int = 0,
                        nonbinary: bool = False) -> list[AssociationPrompt]:
    """Every usable template of each family x every subject pair (pronouns, nouns, ``n_names`` names);
    with ``nonbinary``, each also carries the prompt with a non-binary subject (`_nonbinary_slots`)."""
    unknown = [f for f in families if f not in corpus.FAMILY_ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown association family(ies) {unknown}; allowed: {', '.join(corpus.FAMILIES)}")
    subjects = _subject_pairs(n_names, seed)
    out: list[AssociationPrompt] = []
    for family in families:
        for template in corpus._TEMPLATES[family]:
            cut = _prefix(template)
            if cut is None:
                continue
            head, article = cut
            for index, (kind, f_slots, m_slots) in enumerate(subjects):
                f = corpus._capitalise(head.format(**f_slots))
                m = corpus._capitalise(head.format(**m_slots))
                n = corpus.agree(corpus._capitalise(head.format(**_nonbinary_slots(kind, index)))) if nonbinary else ""
                out.append(AssociationPrompt(len(out), family, template, kind, f, m, article, n))
    return out


def attribute_continuations(family: str, article: bool) -> tuple[list[str], np.ndarray]:
    """The family's attributes as continuations (" a nurse" or " brilliant") and a boolean array,
    True where the attribute is female-stereotyped."""
    attributes = corpus.FAMILY_ATTRIBUTES[family]
    names = sorted(attributes)
    conts = [" " + (corpus._article(a) if article else a) for a in names]
    return conts, np.array([attributes[a] == "female" for a in names])


def _normalised(logp: np.ndarray) -> np.ndarray:
    logp = np.asarray(logp, dtype=float)
    z = logp - logp.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def association_scores(prompts: Sequence[AssociationPrompt], scorer: Scorer) -> pd.DataFrame:
    """Per-pair log: family, template, subject kind, both prompts, a_f, a_m and the pair score; with
    non-binary prompts also ``nonbinary_prompt``, ``a_nonbinary`` and ``nonbinary_lean``."""
    rows = []
    groups: dict[tuple[str, bool], list[AssociationPrompt]] = {}
    for p in prompts:
        groups.setdefault((p.family, p.article), []).append(p)
    for (family, article), items in groups.items():
        conts, female_attr = attribute_continuations(family, article)
        probed = all(p.nonbinary for p in items)
        texts = [p.female for p in items] + [p.male for p in items] + ([p.nonbinary for p in items] if probed else [])
        probs = _normalised(scorer(texts, conts))
        n = len(items)
        a_f = probs[:n][:, female_attr].sum(axis=1)
        a_m = probs[n: 2 * n][:, ~female_attr].sum(axis=1)
        a_n = probs[2 * n:][:, female_attr].sum(axis=1) if probed else [None] * n
        for p, af, am, an in zip(items, a_f, a_m, a_n):
            rows.append({"pair_id": p.pair_id, "family": family, "template": p.template, "subject_kind": p.subject_kind,
                         "female_prompt": p.female, "male_prompt": p.male, "a_female": float(af), "a_male": float(am),
                         "score": float((af + am) / 2)})
            if probed:
                rows[-1].update(nonbinary_prompt=p.nonbinary, a_nonbinary=float(an),
                                nonbinary_lean=float(an - (af + 1.0 - am) / 2))
    return pd.DataFrame(rows).sort_values("pair_id", kind="stable").reset_index(drop=True)


def association_rows(per_pair: pd.DataFrame, planted: dict[str, float] | None, n_boot: int, seed: int) -> list[dict]:
    """Tidy rows ``learned_association_<family>`` x (all, female, male), with ``planted`` beside them,
    and (nonbinary, nonbinary_lean) when ``per_pair`` has non-binary prompts (planted 0.5 and 0)."""
    rows = []
    for family, grp in per_pair.groupby("family", sort=False):
        skew = (planted or {}).get(family, float("nan"))
        metric = f"learned_association_{family}"
        groups = [("all", "score", skew), ("female", "a_female", skew), ("male", "a_male", skew)]
        if "a_nonbinary" in grp.columns:
            groups += [("nonbinary", "a_nonbinary", 0.5), ("nonbinary_lean", "nonbinary_lean", 0.0)]
        for group, column, planted_value in groups:
            values = grp[column].to_numpy(float)
            rows.append(tidy_row(metric, group, bootstrap_ci(values, n_boot=n_boot, seed=seed), len(values),
                                 planted=planted_value))
    return rows


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                          batch_size: int = 256) -> np.ndarray:
    """(n_prompts, n_continuations) total log P(continuation tokens | prompt), every token scored.

    Prompt and continuation are tokenised apart and concatenated (the continuations start with a
    space, so this is how GPT-2's BPE splits the whole string), as training rows are: no BOS.

    Each prompt runs through the model once, with its keys and values cached; the first token of every
    continuation is scored from the prompt's last position, and the rest of the multi-token ones on top
    of the cache, all continuations of a prompt in one batch. This is the computation of scoring each
    whole string (causal attention: a prompt's positions never see what follows), in about a fifth of
    the token positions (a prompt is ~8 tokens, a continuation 1-2, and each prompt has ~24); the
    float32 sums differ from the whole-string ones by rounding only (the test compares with it).
    Prompts of one token length share a batch (no padding inside the cached part); `batch_size`
    bounds the continuation rows of a batch (prompts x multi-token continuations).
    """
    model.eval()
    device = next(model.parameters()).device
    body, head = _body(model), model.get_output_embeddings()
    cache_kw = _cache_keyword(body)
    p_ids, c_ids = token_ids(tokenizer, prompts), token_ids(tokenizer, continuations)
    first = torch.tensor([c[0] for c in c_ids], dtype=torch.long, device=HOST)
    multi = [j for j, c in enumerate(c_ids) if len(c) > 1]
    width = max((len(c_ids[j]) - 1 for j in multi), default=0)
    # the continuation tokens fed on top of the cache (all but the last) and the ones they predict
    feed = torch.zeros((len(multi), max(width, 1)), dtype=torch.long, device=HOST)
    target = torch.zeros_like(feed)
    scored = torch.zeros(feed.shape, dtype=torch.bool, device=HOST)
    for r, j in enumerate(multi):
        k = len(c_ids[j]) - 1
        feed[r, :k] = torch.tensor(c_ids[j][:-1], device=HOST)
        target[r, :k] = torch.tensor(c_ids[j][1:], device=HOST)
        scored[r, :k] = True
    out = np.zeros((len(p_ids), len(c_ids)))
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(p_ids):
        by_length.setdefault(len(ids), []).append(i)
    per_batch = max(1, batch_size // max(1, len(multi)))
    for length, members in sorted(by_length.items()):
        for s in range(0, len(members), per_batch):
            rows = members[s: s + per_batch]
            ids = torch.tensor([p_ids[i] for i in rows], dtype=torch.long, device=HOST)
            pos = torch.arange(length, device=HOST).unsqueeze(0).expand(len(rows), -1)
            res = body(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=bool(multi))
            logp = torch.log_softmax(head(res.last_hidden_state[:, -1]).float(), dim=-1)
            total = logp.index_select(1, first.to(device)).double().cpu()  # (prompts, continuations)
            if multi:
                cache = _cache_of(res)
                cache.batch_repeat_interleave(len(multi))
                n = len(rows) * len(multi)
                cont_pos = (length + torch.arange(feed.shape[1], device=HOST)).unsqueeze(0).expand(n, -1)
                hidden = body(input_ids=feed.repeat(len(rows), 1).to(device), position_ids=cont_pos.to(device),
                              use_cache=False, **{cache_kw: cache}).last_hidden_state
                mask = scored.repeat(len(rows), 1)
                r_idx, c_idx = mask.nonzero(as_tuple=True)
                tok_logp = torch.log_softmax(head(hidden[r_idx.to(device), c_idx.to(device)]).float(), dim=-1)
                tok = tok_logp.gather(-1, target.repeat(len(rows), 1)[r_idx, c_idx].to(device).unsqueeze(-1)).squeeze(-1)
                rest = torch.zeros(n, dtype=torch.float64, device=HOST).index_add_(0, r_idx, tok.double().cpu())
                total[:, multi] += rest.view(len(rows), len(multi))
            out[rows] = total.numpy()
    return out


def _cache_of(output):
    """The key/value cache a forward returned (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_keyword(body) -> str:
    """The keyword under which `body` takes a cache (its signature's `cache`, else `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _body(model):
    """The transformer under a causal-LM head (GPT-2's ``transformer``; other HF models' base model)."""
    return getattr(model, "transformer", None) or model.base_model


def model_scorer(model, tokenizer, batch_size: int = 256) -> Scorer:
    return lambda prompts, conts: continuation_logprobs(model, tokenizer, prompts, conts, batch_size)


_ATTRIBUTE_FAMILY = {a: f for f, attrs in corpus.FAMILY_ATTRIBUTES.items() for a in attrs}
_WORD = re.compile(r"[a-z]+")


def family_of(texts: Sequence[str]) -> list[str]:
    """The attribute family of each controlled-corpus sentence (from the attribute word it contains;
    ``none`` for filler or when words of two families occur)."""
    out = []
    for text in texts:
        found = {_ATTRIBUTE_FAMILY[w] for w in _WORD.findall(str(text).lower()) if w in _ATTRIBUTE_FAMILY}
        out.append(found.pop() if len(found) == 1 else "none")
    return out


def loglik_gap_rows(sentences: pd.DataFrame, logprob: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    """``loglik_gap_<family>`` (group ``diff``): mean log P(stereotypical) - mean log P(anti-stereotypical)
    over held-out sentences of the family (``sentences`` has columns family, label), nats per sentence."""
    rows = []
    logprob = np.asarray(logprob, dtype=float)
    for family in corpus.FAMILIES:
        fam = (sentences["family"] == family).to_numpy()
        st = logprob[fam & (sentences["label"] == "stereotypical").to_numpy()]
        an = logprob[fam & (sentences["label"] == "anti-stereotypical").to_numpy()]
        rows.append(tidy_row(f"loglik_gap_{family}", "diff", bootstrap_diff_ci(st, an, n_boot=n_boot, seed=seed),
                             len(st) + len(an)))
    return rows


def metrics(model, tokenizer, cfg: dict, seed: int, planted: dict[str, float] | None = None,
            test: pd.DataFrame | None = None, nonbinary: bool = False) -> tuple[list[dict], pd.DataFrame]:
    """Learned association per attribute family (with the planted skew as group ``planted``; with
    ``nonbinary``, the non-binary subjects' rows too) and, when ``test`` has stereotype labels, the
    held-out log-likelihood gap: (tidy rows, per-pair log)."""

    n_boot, bs = int(cfg["n_boot"]), int(cfg["batch_size"])
    prompts = association_prompts(n_names=int(cfg["association_names"]), seed=0, nonbinary=nonbinary)
    per_pair = association_scores(prompts, model_scorer(model, tokenizer, max(bs, 256)))
    rows = association_rows(per_pair, planted, n_boot, seed)
    for family, skew in (planted or {}).items():
        rows.append(tidy_row(f"learned_association_{family}", "planted", (skew, skew, skew), 0))
    if test is not None and "label" in test.columns and test["label"].isin(["stereotypical", "anti-stereotypical"]).any():
        sentences = test.assign(family=family_of(test["text"]))
        nll, _ = token_nll(model, [list(ids) for ids in test["input_ids"]], bs, pad_id(tokenizer))
        rows += loglik_gap_rows(sentences, -nll, n_boot, seed)
    return rows, per_pair


def evaluate(ctx):
    """The ``association`` family on an `EvalContext` (its test split gives the log-likelihood gap)."""

    rows, per_pair = metrics(ctx.model, ctx.tokenizer, ctx.cfg, ctx.seed, ctx.planted, ctx.splits.get("test"),
                             nonbinary=ctx.nonbinary)
    return FamilyResult(rows, {"association": per_pair})
