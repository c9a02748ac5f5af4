"""Any causal LM (no model list), checked at `validate` from its config on the meta device, and the
shipped example profile (docs/extending.md)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from dpbias_utils import cli, paths
from dpbias_utils.params import ParamsError, load_profile, parse_profile

EXAMPLE = paths.PARAMS / "example-own-model.yaml"


@pytest.mark.parametrize("base", ["openai-community/gpt2", "distilbert/distilgpt2", "EleutherAI/pythia-70m", "gpt2-xl"])
def test_canonical_hub_ids_validate(base):
    # offline and not cached: the id is well formed; its modules are checked by prefetch / preflight
    assert parse_profile({"model": {"base": base}, "grid": [{"epsilon": [3.0]}]}).model.base == base


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A config-only Llama folder: RMSNorm, which fast clipping has no exact rule for (no weights needed)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(folder)
    return folder


def _write(tmp_path, raw):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_fast_clipping_refuses_a_model_it_cannot_clip_in_one_line(tmp_path, tiny_llama):
    raw = {"model": {"base": str(tiny_llama)}, "grid": [{"epsilon": [None, 3.0]}]}
    f = _write(tmp_path, raw)
    proc = subprocess.run([sys.executable, "-m", "dpbias_utils.cli", "validate", str(f)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    assert "train.clipping" in proc.stderr and "LlamaRMSNorm" in proc.stderr and "allowed: clipping: opacus" in proc.stderr
    raw["train"] = {"clipping": "opacus"}
    assert load_profile(_write(tmp_path, raw)).train.clipping == "opacus"
    # freeze must name parameters the model has (GPT-2's wte / wpe: Llama has neither)
    raw["train"]["freeze"] = ["embeddings"]
    with pytest.raises(ParamsError, match="train.freeze.*'embeddings'.*names no parameter of this model"):
        load_profile(_write(tmp_path, raw))


def test_a_config_that_is_no_causal_lm_is_refused(tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    with pytest.raises(ParamsError, match="model.base.*not a causal LM"):
        parse_profile({"model": {"base": str(tmp_path / "t5")}, "grid": [{"epsilon": [None]}]})


def test_example_profile_validates_offline_on_a_non_gpt2_model(capsys):
    assert cli.main(["validate", str(EXAMPLE)]) == 0
    p = load_profile(EXAMPLE)
    assert p.data.text.text_column == "body" and p.data.text.split_fractions
    from dpbias_utils import basemodel

    config, owners = basemodel.model_structure(str(paths.resolve_path(p.model.base)))
    assert type(config).__name__ == "GPTNeoXConfig" and owners
