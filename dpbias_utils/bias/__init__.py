"""Stage 04's bias metrics, one module per family; each module's docstring defines its metrics.

`prompts` (prompt sets), `generation` (seeded batched sampling), `toxicity`, `sentiment`,
`occupation`, `gender_count`, `local_bias`, `perplexity`, `stereotype`, and `evaluate`, which runs
the enabled families on one model and writes ``metrics.csv`` / ``generations.jsonl``.
"""
from .evaluate import DEFAULT_CFG, METRIC_FAMILIES, evaluate_model
from .generation import generate
from .prompts import load_prompt_sets
from .toxicity import get_toxicity_scorer

__all__ = ["DEFAULT_CFG", "METRIC_FAMILIES", "evaluate_model", "generate", "load_prompt_sets", "get_toxicity_scorer"]
