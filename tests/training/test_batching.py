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


def _sliced_row_losses(logits, labels):
    """The textbook form `row_losses` must equal bit for bit: drop the last position, shift labels."""
    import torch.nn.functional as F

    from dpbias_utils.training.batching import IGNORE_INDEX

    sliced, targets = logits[:, :-1, :], labels[:, 1:]
    ce = F.cross_entropy(sliced.reshape(-1, sliced.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return ce.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


@pytest.mark.parametrize("rows,width,vocab,dtype", [(32, 64, 2000, torch.float32), (3, 17, 101, torch.float64),
                                                     (4, 1, 50, torch.float32), (2, 128, 5003, torch.float32)])
def test_row_losses_bit_identical_to_the_sliced_form(rows, width, vocab, dtype):
    """Shifting the targets instead of slicing the logits changes no bit of the losses or their
    gradients (padding, a fully ignored row and one-token rows included)."""
    from dpbias_utils.training.batching import IGNORE_INDEX, row_losses

    gen = torch.Generator().manual_seed(rows * width)
    base = torch.randn(rows, width, vocab, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (rows, width), generator=gen)
    labels[0, width // 2:] = IGNORE_INDEX
    if rows > 2:
        labels[1] = IGNORE_INDEX
    weights = torch.rand(rows, generator=gen, dtype=dtype)
    out = []
    for fn in (row_losses, _sliced_row_losses):
        x = base.clone().requires_grad_()
        loss = fn(x, labels)
        (loss * weights).sum().backward()
        out.append((loss.detach(), x.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])
    if width == 1:
        assert torch.equal(out[0][0], torch.zeros(rows, dtype=dtype))
