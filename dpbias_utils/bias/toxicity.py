"""Toxicity of generated continuations, behind one interface so profiles can swap classifiers.

Metric ``toxicity``: the probability that a continuation is toxic according to a classifier,
averaged over the continuations of a group (female / male prompts); ``diff`` = female - male.

Backends:

* ``detoxify``: Detoxify (Hanu & Unitary 2020), the classifier used in the paper. ``checkpoint``
  is a Detoxify model type (``original`` by default, ``unbiased``, ``multilingual``,
  ``original-small``, ``unbiased-small``), which downloads its weights at run time, or a local
  ``.ckpt`` file in Detoxify's format (``{"config": ..., "state_dict": ...}``); for a local file,
  ``config_path`` names a folder with the Hugging Face config and tokenizer so nothing is fetched.
  The score is Detoxify's ``toxicity`` head (sigmoid).
* ``profanity``: alt-profanity-check's ``predict_prob`` (a linear SVM on TF-IDF features shipped
  with the package): offline, fast, and the default of the embedded profile. It measures profane /
  offensive wording rather than toxicity in general.

Reference implementations: unitaryai/detoxify ``detoxify/detoxify.py`` (``Detoxify.predict``, the
``toxicity`` output) and dimitrismistriotis/alt-profanity-check ``profanity_check/profanity_check.py``
(``predict_prob``), both called as published; the test pins the offline backend to
``predict_prob`` on real BOLD prompts. Aggregation (mean per prompt, female - male) follows the
paper's Table 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from .context import FamilyResult, per_prompt_rows

__all__ = ["get_toxicity_scorer", "BACKENDS", "DETOXIFY_MODEL_TYPES"]

BACKENDS = ("detoxify", "profanity")
DETOXIFY_MODEL_TYPES = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")


def _profanity_scorer() -> Callable[[list[str]], np.ndarray]:
    from profanity_check import predict_prob

    def score(texts: list[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        if not texts:
            return np.zeros(0, dtype=float)
        return np.asarray(predict_prob(texts), dtype=float)

    return score


def _detoxify_scorer(checkpoint: str | None, device: str, config_path: str | None, batch_size: int):
    from detoxify import Detoxify

    try:
        if checkpoint is None or checkpoint in DETOXIFY_MODEL_TYPES:
            model = Detoxify(model_type=checkpoint or "original", device=device)
        else:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"Detoxify checkpoint {checkpoint!r} is neither a model type {DETOXIFY_MODEL_TYPES} "
                    "nor an existing file"
                )
            model = Detoxify(
                checkpoint=str(path),
                device=device,
                huggingface_config_path=None if config_path is None else str(Path(config_path).expanduser()),
            )
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise RuntimeError(
            f"Could not load the Detoxify model ({checkpoint or 'original'}): {type(err).__name__}: {err}. "
            "Detoxify downloads its weights (and its Hugging Face config/tokenizer) at run time; offline, "
            "pass toxicity_checkpoint=<local .ckpt> with config_path=<folder with config and tokenizer>, "
            "or use toxicity_backend='profanity'."
        ) from err

    def score(texts: list[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        out = []
        for s in range(0, len(texts), batch_size):
            pred = model.predict(texts[s : s + batch_size])["toxicity"]
            out.extend(np.atleast_1d(np.asarray(pred, dtype=float)).tolist())
        return np.asarray(out, dtype=float)

    return score


def get_toxicity_scorer(
    backend: str,
    checkpoint: str | None = None,
    device: str = "cpu",
    config_path: str | None = None,
    batch_size: int = 32,
) -> Callable[[list[str]], np.ndarray]:
    """A function texts -> toxicity probabilities in [0, 1], one per text."""
    if backend == "profanity":
        if checkpoint is not None:
            raise ValueError("the 'profanity' backend ships its own model; checkpoint must be None")
        return _profanity_scorer()
    if backend == "detoxify":
        return _detoxify_scorer(checkpoint, device, config_path, batch_size)
    raise ValueError(f"unknown toxicity backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def evaluate(ctx):
    """The ``toxicity`` family: score every sampled continuation, then per-prompt rows."""

    gens = ctx.generations()
    cfg = ctx.cfg
    scorer = get_toxicity_scorer(cfg["toxicity_backend"], cfg["toxicity_checkpoint"],
                                 device="cuda" if ctx.device.type == "cuda" else "cpu",
                                 config_path=cfg["toxicity_config_path"], batch_size=ctx.batch_size)
    conts = list(gens["continuation"])
    gens["toxicity"] = scorer(conts) if conts else np.zeros(0)
    return FamilyResult(per_prompt_rows("toxicity", gens, "toxicity", ctx.n_boot, ctx.seed))
