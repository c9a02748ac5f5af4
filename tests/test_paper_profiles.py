"""The paper profiles validate offline, and the paper's code path runs end to end on local stand-ins.

The end-to-end test loads `params/paper-distilgpt2.yaml` and changes only (a) path-like fields, to
local stand-ins in the hub's formats, and (b) sizes (grid, rows, batch, evaluation sample sizes):

* model.base -> a 1-layer GPT-2 saved with `save_pretrained`, with GPT-2's genuine tokenizer;
* data.text.source -> a folder laid out like the hub's WikiText parquet export
  (`<dir>/wikitext-103-raw-v1/{train,validation,test}-00000-of-00001.parquet`, column `text`),
  built from the shared WikiText slices; the config name stays the paper's;
* BOLD -> the shared JSON; StereoSet -> McGill-NLP/stereoset's parquet tree (intrasentence/validation-*.parquet);
  CrowS-Pairs stays `hub`: the pinned official CSV, from the asset cache as `dpbias prefetch` leaves it;
* Detoxify `original` -> a tiny BERT checkpoint in Detoxify's own checkpoint format.

Then `cli.run` executes the real notebooks and the test reads `results.csv` and `privacy.csv`.
"""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml

from dpbias_utils import cli, paths
from dpbias_utils.params import _Loader, load_profile, parse_profile

DISTIL = paths.PARAMS / "paper-distilgpt2.yaml"
XL = paths.PARAMS / "paper-gpt2-xl.yaml"

# Fields the offline run may change: paths (to local stand-ins) and sizes. Anything else must stay
# as the paper profile has it, so the test exercises the paper's own settings.
PATH_FIELDS = {"model.base", "data.text.source", "evaluation.bold_source", "evaluation.stereoset_source",
               "evaluation.crows_pairs_source", "evaluation.toxicity_checkpoint", "evaluation.toxicity_config_path"}
# No GPU on the test machine: the one non-path, non-size field changed (the paper profile says cuda).
DEVICE_FIELDS = {"train.device"}
SIZE_FIELDS = {"name", "grid", "data.text.max_train_rows", "data.text.max_eval_rows", "data.max_train_units",
               "train.logical_batch_size", "train.physical_batch_size", "train.checkpoint_every",
               "gradnorms.max_units_per_split", "gradnorms.batch_size", "gradnorms.n_boot",
               "evaluation.max_prompts_per_group", "evaluation.k", "evaluation.max_new_tokens",
               "evaluation.batch_size", "evaluation.stereotype_max_items", "evaluation.local_bias_max_pairs",
               "evaluation.n_boot", "execution"}


def _raw(path):
    return yaml.load(path.read_text(), Loader=_Loader)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("execution",):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- offline validation
@pytest.mark.parametrize("path", [DISTIL, XL], ids=["distilgpt2", "gpt2-xl"])
def test_paper_profiles_validate_offline(path, capsys):
    assert cli.main(["validate", str(path)]) == 0
    assert "valid profile" in capsys.readouterr().out
    p = load_profile(path)
    assert p.data.corpus == "text" and p.data.text.source == "Salesforce/wikitext"
    assert p.data.text.config == "wikitext-103-raw-v1"
    assert p.train.max_grad_norm == 0.1
    assert {pt["epsilon"] for pt in p.points()} == {None, 3.0, 10.0, 20.0}
    assert p.evaluation.toxicity_backend == "detoxify" and p.evaluation.toxicity_checkpoint == "original"
    assert p.evaluation.stereoset_source == "hub" and p.evaluation.crows_pairs_source == "hub"
    assert "stereotype" in p.evaluation.metrics
    assert set(p.execution.resources) == {"01", "02", "03", "04", "05"}
    assert p.execution.resources["02"].gpus >= 1 and p.execution.resources["01"].gpus == 0
    # every hyper-parameter the paper does not state carries a justification comment
    text = path.read_text()
    for key in ("block_size", "logical_batch_size", "physical_batch_size", "lr", "epochs", "delta", "max_train_units"):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
        assert "chosen:" in line, f"{path.name}: {key} has no 'chosen:' justification"


def test_paper_distilgpt2_grid_is_the_papers():
    p = load_profile(DISTIL)
    assert p.model.base == "distilgpt2"
    pts = p.points()
    assert sorted({pt["mixing_ratio"] for pt in pts}) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sorted({pt["seed"] for pt in pts}) == [0, 1, 2]
    assert len(pts) == 4 * 5 * 3
    assert p.evaluation.bold_source == "hub" and "bold" in p.evaluation.prompt_sets


def test_paper_gpt2_xl_reports_stereotypes_by_bias_type():
    p = load_profile(XL)
    assert p.model.base == "gpt2-xl"
    # hub StereoSet / CrowS-Pairs carry every bias type; stereotype_rows reports each one (race, religion, ...)
    assert p.evaluation.stereotype_max_items is None and "stereotype" in p.evaluation.metrics


# --------------------------------------------------------------------------- offline end to end
def _tiny_gpt2(folder, shared_data):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    assert len(tok) == 50257
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _hub_layout_wikitext(root, shared_data, config="wikitext-103-raw-v1"):
    """WikiText rows as the hub's parquet export lays them out (empty rows kept, as on the hub)."""
    src = shared_data / "wikitext"
    d = root / config
    d.mkdir(parents=True)
    for split, name in (("train", "wikitext-2-raw.test.txt"), ("validation", "wikitext-103.valid.tokens.txt"),
                        ("test", "wikitext-103.test.tokens.txt")):
        rows = (src / name).read_text(encoding="utf-8").split("\n")
        pd.DataFrame({"text": [r + "\n" if r else "" for r in rows]}).to_parquet(d / f"{split}-00000-of-00001.parquet")
    return root


def _hub_stereoset_tree(root, shared_data):
    """McGill-NLP/stereoset's parquet tree (tests/bias/test_stereotype.py builds it from the shared items)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stereotype_tests", paths.REPO_ROOT / "tests" / "bias" / "test_stereotype.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hub_stereoset_tree(root, shared_data)


def _tiny_detoxify(folder):
    """A Detoxify-format checkpoint (config + state_dict) of a 1-layer BERT, and its HF config folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    hf = folder / "hf"
    hf.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "he", "she", "was", "a", "an", "and", "of"]
    (hf / "vocab.txt").write_text("\n".join(words) + "\n")
    # bert-base-uncased's limit: Detoxify truncates to the tokenizer's model_max_length
    BertTokenizer(vocab_file=str(hf / "vocab.txt"), model_max_length=512).save_pretrained(hf)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=512, num_labels=6)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(hf)
    ckpt = folder / "toxic_original-tiny.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": str(hf), "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": 6}},
                           "dataset": {"args": {"classes": ["toxic", "severe_toxic", "obscene", "threat", "insult",
                                                            "identity_hate"]}}},
                "state_dict": model.state_dict()}, ckpt)
    return ckpt, hf


def offline_paper_profile(tmp_path, shared_data) -> tuple[dict, dict]:
    """(offline raw profile, original raw profile)."""
    original = _raw(DISTIL)
    raw = copy.deepcopy(original)
    ckpt, hf = _tiny_detoxify(tmp_path / "detoxify")
    # paths -> local stand-ins
    raw["model"]["base"] = str(_tiny_gpt2(tmp_path / "distilgpt2-tiny", shared_data))
    raw["data"]["text"]["source"] = str(_hub_layout_wikitext(tmp_path / "wikitext", shared_data))
    ev = raw["evaluation"]
    ev["bold_source"] = str(shared_data / "bold" / "gender_prompt.json")
    ev["stereoset_source"] = str(_hub_stereoset_tree(tmp_path / "McGill-NLP--stereoset", shared_data))
    # CrowS-Pairs stays `hub`: the pinned official CSV, served from the asset cache (`dpbias prefetch`
    # puts it there; the test's DPBIAS_ASSETS holds the same bytes, which the sha256 pin checks)
    ev["toxicity_checkpoint"] = str(ckpt)
    ev["toxicity_config_path"] = str(hf)
    # sizes
    raw["name"] = "paper-distilgpt2-offline"
    raw["grid"] = [{"epsilon": [None, 3.0], "mixing_ratio": [0.0], "cda_mode": ["substitute"], "seed": [0]}]
    raw["train"]["device"] = "cpu"
    raw["data"]["text"]["max_train_rows"] = 70
    raw["data"]["text"]["max_eval_rows"] = 30
    raw["train"].update(logical_batch_size=16, physical_batch_size=16, checkpoint_every=10)
    raw["gradnorms"].update(max_units_per_split=8, batch_size=8, n_boot=50)
    ev.update(max_prompts_per_group=4, k=1, max_new_tokens=6, batch_size=16, stereotype_max_items=16,
              local_bias_max_pairs=4, n_boot=50)
    raw.pop("execution", None)
    return raw, original


def _served_crows_pairs(tmp_path, shared_data, monkeypatch):
    """The asset cache as `dpbias prefetch` leaves it: the pinned CSV under its commit's name."""
    from dpbias_utils.bias import stereotype

    monkeypatch.setenv("DPBIAS_ASSETS", str(tmp_path / "assets"))
    target = paths.asset_cache() / f"crows_pairs_anonymized-{paths.CROWS_PAIRS_COMMIT[:12]}.csv"
    target.parent.mkdir(parents=True)
    target.write_bytes((shared_data / "crows-pairs" / "crows_pairs_anonymized.csv").read_bytes())
    assert stereotype.crows_pairs_csv(download=False) == target


@pytest.mark.slow
def test_paper_distilgpt2_code_path_offline(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _served_crows_pairs(tmp_path, shared_data, monkeypatch)
    raw, original = offline_paper_profile(tmp_path, shared_data)
    a, b = _flat(raw), _flat(original)
    changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    allowed = PATH_FIELDS | SIZE_FIELDS | DEVICE_FIELDS
    assert changed <= allowed, f"non-path, non-size fields changed: {changed - allowed}"
    assert a["data.text.config"] == "wikitext-103-raw-v1" and a["train.max_grad_norm"] == 0.1
    assert a["evaluation.toxicity_backend"] == "detoxify" and a["data.block_size"] == b["data.block_size"]

    profile = parse_profile(raw, "offline paper profile")
    # two node processes at a time, as `make demo` runs the tiny profile: independent nodes (the two
    # training runs, their gradient norms, the three evaluations) overlap on the test machine's 2 cores
    result = cli.run(profile, runs_dir=tmp_path / "runs", progress=False, jobs=2)
    pdir = tmp_path / "runs" / profile.name
    assert result.ok, f"failed: {[n.stage + '/' + n.node_id for n in result.failed]}, blocked: {len(result.blocked)}"

    results = pd.read_csv(pdir / "results.csv")
    privacy = pd.read_csv(pdir / "privacy.csv")
    metrics = set(results["metric"])
    for m in ("toxicity", "sentiment", "perplexity_corpus", "stereoset", "crows_pairs", "local_kl_fm", "gender_count_bias"):
        assert m in metrics, f"{m} missing from results.csv ({sorted(metrics)})"
    tox = results[(results["metric"] == "toxicity") & (results["group"] != "diff")]  # diff = female - male may be < 0
    assert tox["value"].between(0, 1).all() and len(tox) > 0
    # both the fine-tuned run and the pretrained base were evaluated
    assert set(results["run_id"]) >= {"base"} and results["run_id"].nunique() == 3
    assert set(results.loc[results["dp"].astype(bool), "max_grad_norm"]) == {0.1}  # the DP run's C
    assert len(privacy) == 2
    row = privacy.dropna(subset=["epsilon_target"]).iloc[0]
    assert row["epsilon_target"] == 3.0 and 0 < row["epsilon_spent"] <= 3.0 + 1e-9
    assert row["steps"] >= 1 and row["noise_multiplier"] > 0
    # the units are GPT-2 BPE chunks of at most block_size tokens
    data_dir = next((pdir / paths.STAGE_DIRS["01"]).iterdir())
    train = pd.read_parquet(data_dir / "train.parquet")
    assert train["n_tokens"].max() <= profile.data.block_size
    assert (pdir / "index.html").is_file()
    # ends in verdicts on the paper's claims that real text can test (one seed: "uninformative" by the
    # study's rule, never the wrong "no non-DP run"), CrowS-Pairs by bias type among them
    verdicts = pd.read_csv(pdir / "claims.csv").set_index("id")["verdict"]
    assert "amplify-output/toxicity/3" in verdicts and "text/crows_pairs/race-color/3" in verdicts
    assert not verdicts.str.contains("no non-DP run").any()
    assert (results["metric"] == "distinct_2").any()
