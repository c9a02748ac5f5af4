"""allocator.tune: a training step's freed memory is reused (page faults gone), the weights the same bits."""
import os
import subprocess
import sys

import pytest

STEPS = r'''
import hashlib, resource, sys
import torch
from dpbias_utils import allocator
tuned = allocator.tune()
from transformers import GPT2Config, GPT2LMHeadModel
from dpbias_utils.training.batching import row_losses
torch.manual_seed(0); torch.set_num_threads(1)
model = GPT2LMHeadModel(GPT2Config(vocab_size=1675, n_layer=2, n_head=4, n_embd=64, n_positions=128,
                                   bos_token_id=0, eos_token_id=0))
opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
ids = torch.randint(0, 1675, (32, 20))
def step():
    opt.zero_grad(set_to_none=True)
    row_losses(model(input_ids=ids).logits, ids).mean().backward()
    opt.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(tuned, faults, digest)
'''


def _run(**env):
    proc = subprocess.run([sys.executable, "-c", STEPS], env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned, faults, digest = proc.stdout.split()[-3:]
    return tuned == "True", int(faults), digest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_memory_and_changes_no_bit():
    tuned, faults, digest = _run()
    # any MALLOC_*_ variable is the user's own glibc setting: tune() leaves glibc's defaults alone
    untuned, faults_default, digest_default = _run(MALLOC_PERTURB_="0")
    assert tuned and not untuned
    assert digest == digest_default  # the same weights after 23 Adam steps
    assert faults_default > 1000 and faults < faults_default / 20, (faults, faults_default)
