"""`dpbias prefetch` / `preflight` and the asset list, offline: hub downloads are served by local
stand-ins written in the layouts the libraries read (the hub cache's models--<ns>--<name>/snapshots,
the pinned CrowS-Pairs CSV), then every asset is checked with the hub offline."""
from __future__ import annotations

import io
import urllib.request

import pandas as pd
import pytest
import torch

from dpbias_utils import assets, cli, paths
from dpbias_utils.params import load_profile, parse_profile

DISTIL = paths.PARAMS / "paper-distilgpt2.yaml"


def test_paper_profile_assets_and_offline_profiles():
    listed = {(a.kind, a.name, a.config) for a in assets.profile_assets(load_profile(DISTIL))}
    assert listed == {("model", "distilgpt2", None), ("dataset", "Salesforce/wikitext", "wikitext-103-raw-v1"),
                      ("dataset", "AlexaAI/bold", None), ("dataset", "McGill-NLP/stereoset", "intrasentence"),
                      ("file", paths.CROWS_PAIRS_URL, None), ("detoxify", "original", None)}
    assert not assets.needs_hub(load_profile(paths.DEFAULT_PARAMS))  # runs offline as it is


def _tiny_gpt2_files(folder, shared_data):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2-tokenizer"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=64)).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("DPBIAS_ASSETS", str(tmp_path / "assets"))
    return cache


def test_prefetch_fills_the_caches_and_every_asset_then_loads_offline(tmp_path, hub_cache, monkeypatch, shared_data,
                                                                       capsys):
    import huggingface_hub

    served = []

    def snapshot_download(repo_id, allow_patterns=None):  # the hub, as a local stand-in
        served.append(repo_id)
        snap = hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        _tiny_gpt2_files(snap, shared_data)
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("0" * 40)
        return str(snap)

    csv_bytes = (shared_data / "crows-pairs" / "crows_pairs_anonymized.csv").read_bytes()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(csv_bytes))
    raw = {"name": "pf", "model": {"base": "someone/tiny-gpt2"}, "grid": [{"epsilon": [None, 3.0]}],
           "evaluation": {"metrics": ["stereotype"], "stereoset_source": "controlled", "crows_pairs_source": "hub"}}
    profile = parse_profile(raw)
    assert [a.kind for a in assets.profile_assets(profile)] == ["model", "file"]
    rows = assets.prefetch(profile, out=print)
    assert served == ["someone/tiny-gpt2"]
    assert [r["check"].split(":")[0] for r in rows] == ["ok", "ok"], rows
    assert "GPT2Config" in rows[0]["check"] and "1,508 pairs" in rows[1]["check"]
    assert str(paths.asset_cache()) in rows[1]["where"]
    # a second machine that only checks (download=False) sees the same, offline
    assert all(r["check"].startswith("ok") for r in assets.prefetch(profile, out=print, download=False))


def test_prefetch_reports_a_failing_asset_and_goes_on(hub_cache, monkeypatch, shared_data):
    import huggingface_hub

    def refuse(repo_id, allow_patterns=None):
        raise OSError("401 Client Error: gated repository")

    csv_bytes = (shared_data / "crows-pairs" / "crows_pairs_anonymized.csv").read_bytes()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(csv_bytes))
    raw = {"name": "pf", "model": {"base": "someone/gated"}, "grid": [{"epsilon": [None]}],
           "evaluation": {"metrics": ["stereotype"], "stereoset_source": "controlled", "crows_pairs_source": "hub"}}
    rows = assets.prefetch(parse_profile(raw), out=print)
    assert rows[0]["check"].startswith("FAILED: OSError: 401") and rows[1]["check"].startswith("ok")


def test_preflight_measures_every_way_of_training_and_feeds_the_estimate(tmp_path, monkeypatch):
    """On a local model (no asset): each way of training of the grid takes steps on the device, and the
    rows appended to throughput.csv are what the dry run's estimate then reads as measured."""
    from dpbias_utils import cost, preflight

    model_dir = paths.REPO_ROOT / "examples" / "tiny-neox"
    raw = {"name": "pre", "model": {"base": str(model_dir)}, "data": {"block_size": 16},
           "train": {"device": "cpu", "physical_batch_size": 4, "logical_batch_size": 4, "clipping": "fast"},
           "gradnorms": {"batch_size": 4}, "evaluation": {"batch_size": 4, "max_new_tokens": 3},
           "grid": [{"epsilon": [None, 3.0]}, {"epsilon": [3.0], "method": ["global"]}]}
    raw["train"]["sgd_lr"] = 0.1
    profile = parse_profile(raw)
    csv_path = tmp_path / "throughput.csv"
    result = preflight.preflight(profile, out=print, steps=1, warmup=0, throughput_csv=csv_path)
    assert result["ok"] and {r["mode"] for r in result["training"]} == {"nondp", "dp-fast", "global"}
    assert {r["mode"] for r in result["stages"]} == {"gradnorms", "generate"}
    rows = cost.load_throughput(csv_path)
    assert all(r.measured and r.model == "tiny-neox" and r.device == "cpu" and r.tokens_per_s > 0 for r in rows)
    est = cost.estimate(profile, gpus=["cpu"], throughput_csv=csv_path)
    tps, how = est["devices"]["cpu"]["throughput"]["dp-fast"]
    assert tps == pytest.approx(next(r.tokens_per_s for r in rows if r.mode == "dp-fast")) and how.startswith("measured")


def test_preflight_without_the_profiles_gpu_is_one_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["preflight", str(DISTIL)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "train.device" in err and ("CPU-only build" in err or "sees no GPU" in err)


def test_dry_run_estimate_adds_disk_and_preflight_stage_costs(tmp_path):
    from dpbias_utils import cost

    profile = load_profile(DISTIL)
    csv_path = tmp_path / "throughput.csv"
    csv_path.write_text("model,mode,device,block_size,physical_batch,precision,tokens_per_s,peak_mem_gb,source,date\n"
                        "distilgpt2,nondp,A100,128,32,fp32,20000,,measured by dpbias preflight,2026-12-07\n"
                        "distilgpt2,dp,A100,128,32,fp32,15000,,measured by dpbias preflight,2026-12-07\n"
                        "distilgpt2,gradnorms,A100,128,32,fp32,8000,,measured by dpbias preflight,2026-12-07\n"
                        "distilgpt2,generate,A100,128,64,fp32,4000,,measured by dpbias preflight,2026-12-07\n")
    text = cost.describe_cost(profile, gpus=["A100"], throughput_csv=csv_path)
    assert "disk of stage 02: ~2.59 GB per run" in text  # 82M parameters x 4 B x (5 copies + 3 for a checkpoint)
    # stage 03: 4 snapshots x 2 splits x 500 units x 128 tokens / 8000 tokens/s = 64 s
    assert "stage 03 on A100: ~1.1 min per run" in text
    # stage 04: 3,204 BOLD prompts x k 3 x 25 tokens / 4000 tokens/s = 60 s
    assert "stage 04 generation on A100: ~1.0 min per model" in text
    assert "measured: distilgpt2 dp on A100" in text


def test_no_makefile_default_forces_a_hub_profile_offline():
    # `make study PARAMS=params/paper-...` must be able to download; dpbias runs no-hub profiles offline itself
    exports = [line for line in (paths.REPO_ROOT / "Makefile").read_text().splitlines() if line.startswith("export")]
    assert not any("OFFLINE" in line for line in exports), exports
    assert assets.needs_hub(load_profile(DISTIL)) and not assets.needs_hub(load_profile(paths.PARAMS / "example-own-model.yaml"))
