"""Privacy units as batches and the per-unit loss (dpbias_utils.training.batching)."""
import pytest
import torch

from dpbias_utils.training import UnitDataset, collate_units, per_unit_loss
from training_helpers import frame, tiny_gpt2


def test_unit_dataset_and_collate():
    df = frame(5)
    ds = UnitDataset(df, pad_token_id=0)
    assert len(ds) == 5 and ds.n_rows == 7 and ds.unit_ids == [0, 1, 2, 3, 4]
    orig = df[(df.unit_id == 1) & (df.kind == "original")].input_ids.iloc[0]
    assert ds[1][0].tolist() == list(orig)  # original row first
    b = collate_units([ds[i] for i in (3, 0, 1)], pad_token_id=0)
    assert b["unit_index"].tolist() == [0, 0, 1, 2, 2]
    R, T = b["input_ids"].shape
    assert R == 5 and T == max(len(r) for i in (3, 0, 1) for r in ds[i])
    assert b["position_ids"].shape == (R, T) and b["position_ids"].is_contiguous()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert b["attention_mask"].sum(1).tolist() == [len(r) for i in (3, 0, 1) for r in ds[i]]
    empty = collate_units([], pad_token_id=0)
    assert empty["input_ids"].shape[0] == 0 and empty["unit_index"].numel() == 0


def test_per_unit_loss_is_sum_of_row_means():
    model = tiny_gpt2(dtype=torch.float64).eval()
    ds = UnitDataset(frame(4), pad_token_id=0)
    got = per_unit_loss(model, collate_units([ds[i] for i in range(4)], 0))
    for u in range(4):
        ref = 0.0
        for row in ds[u]:
            x = row[None]
            logits = model(input_ids=x).logits[0, :-1]
            ref += torch.nn.functional.cross_entropy(logits, row[1:]).item()  # mean over its real tokens
        assert got[u].item() == pytest.approx(ref, rel=1e-9)
