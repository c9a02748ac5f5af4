"""CrowS-Pairs and StereoSet of a model on the real data, by the project and, where
lm-evaluation-harness is importable, by lm-eval's own log-likelihoods (its HFLM on the same model).

    python benchmarks/reference_metrics.py [MODEL] [--data ../shared/data]

MODEL: a local model folder or hub id; default: the embedded default profile's base model (built
and cached as `dpbias run` would). Prints one line per number; nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpbias_utils import basemodel, params, paths  # noqa: E402
from dpbias_utils.bias import stereotype  # noqa: E402


def lm_eval_crows(model_path: str, pairs) -> tuple[np.ndarray, np.ndarray] | None:
    """lm-eval's rule on lm-eval's log-likelihoods: loglikelihood("", sentence), sent_more > sent_less."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    lm = HFLM(pretrained=model_path, tokenizer=model_path, device="cpu", batch_size=16)
    sentences = list(pairs["sent_more"]) + list(pairs["sent_less"])
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=("", s), idx=i) for i, s in enumerate(sentences)]
    ll = np.array([r[0] for r in lm.loglikelihood(requests, disable_tqdm=True)])
    n = len(pairs)
    return (ll[:n] > ll[n:]).astype(float), ll


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--data", default=str(paths.SHARED_DATA))
    args = ap.parse_args(argv)
    data = Path(args.data)
    model_path = args.model or basemodel.base_for_profile(params.load_profile(ROOT / "params" / "default.yaml"))
    model, tok = basemodel.load_base(model_path)
    pairs = stereotype.load_crows_pairs(data / "crows-pairs" / "crows_pairs_anonymized.csv")
    per = stereotype.crows_pairs_items(model, tok, pairs, batch_size=32)
    gender = (pairs["bias_type"] == "gender").to_numpy()
    print(f"model: {model_path}")
    print(f"crows_pairs project: all {100 * per['stereotypical'].mean():.2f} (n={len(per)}), "
          f"gender {100 * per.loc[gender, 'stereotypical'].mean():.2f} (n={gender.sum()})")
    ref = lm_eval_crows(model_path, pairs)
    if ref is None:
        print("crows_pairs lm-eval: not installed (pip install lm_eval to compare)")
    else:
        decisions, ll = ref
        n = len(pairs)
        gap = np.abs(np.concatenate([per["loglik_more"], per["loglik_less"]]) - ll).max()
        print(f"crows_pairs lm-eval:  all {100 * decisions.mean():.2f}, gender {100 * decisions[gender].mean():.2f}; "
              f"decisions equal on {(decisions == per['stereotypical'].to_numpy()).sum()}/{n} pairs; "
              f"max |log-likelihood difference| {gap:.2e} nats")
    items = stereotype.load_stereoset(data / "stereoset" / "stereoset_gender_intrasentence.json")
    rows = stereotype.stereoset_rows(stereotype.stereoset_items(model, tok, items, batch_size=32), n_boot=1000)
    ss = {r["metric"]: r for r in rows if r["group"] == "gender"}
    print("stereoset (gender, {} items): ".format(len(items)) + ", ".join(
        f"{m} {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for m, r in ss.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
