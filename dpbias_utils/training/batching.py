"""Privacy units as training batches, and the one per-row language-model loss.

A privacy unit is one original text chunk (`unit_id`); in CDA `augment` mode its counterfactual row
belongs to the same unit. `UnitDataset` holds each unit's token rows, `collate_units` pads the rows of
a list of units into one batch and records which unit each row belongs to (`unit_index`).

The loss of a row is the mean next-token cross-entropy over its real tokens (`row_losses`); a unit's
loss is the sum of its rows' losses (`per_unit_loss`). Training (every stepper), fast clipping
(`fastclip.row_lm_losses`) and the offline base model (`basemodel._sentence_phase`) take their loss
from `row_losses`. Stage 03 (`gradnorms._row_nll`) keeps a functional form of the same formula: it
runs inside `torch.func.vmap` and also reports the summed NLL of each row.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import seeds

IGNORE_INDEX = -100


class TrainingError(ValueError):
    """Training arguments that cannot be run."""


# --------------------------------------------------------------------------- units and batches
class UnitDataset(Dataset):
    """Item i = the token-id rows (LongTensors) of privacy unit i, original row first."""

    def __init__(self, df, pad_token_id: int):
        missing = {"unit_id", "input_ids"} - set(df.columns)
        if missing:
            raise TrainingError(f"training frame lacks columns {sorted(missing)}")
        if len(df) == 0:
            raise TrainingError("training frame is empty")
        self.pad_token_id = int(pad_token_id)
        order = df.assign(_kind_rank=(df["kind"] != "original").astype(int) if "kind" in df.columns else 0,
                          _pos=np.arange(len(df)))
        order = order.sort_values(["unit_id", "_kind_rank", "_pos"], kind="stable")
        self.unit_ids: list[int] = []
        self.units: list[list[torch.Tensor]] = []
        # `order` is sorted by unit: each unit is one run of equal ids (no pandas group per unit)
        uids = order["unit_id"].to_numpy()
        token_rows = order["input_ids"].tolist()
        starts = [0, *(np.flatnonzero(uids[1:] != uids[:-1]) + 1).tolist(), len(uids)]
        for start, end in zip(starts[:-1], starts[1:]):
            rows = [torch.as_tensor(np.asarray(ids, dtype=np.int64), device="cpu") for ids in token_rows[start:end]]  # host
            if any(len(r) == 0 for r in rows):
                raise TrainingError(f"unit {uids[start]} has an empty token row")
            self.unit_ids.append(int(uids[start]))
            self.units.append(rows)
        self.n_rows = sum(len(u) for u in self.units)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.units[i]

    def batch(self, idxs: Sequence[int]) -> dict:
        """The collated batch of units `idxs` (positions in this dataset)."""
        return collate_units([self[i] for i in idxs], self.pad_token_id)


def collate_units(items: Sequence[Sequence], pad_token_id: int) -> dict:
    """Pad the rows of a list of units into one batch; `unit_index[r]` = position of row r's unit."""
    host = torch.device("cpu")  # batches are built on the host, then moved (`to_device`): never the default device
    rows, unit_index = [], []
    for u, item in enumerate(items):
        for row in item:
            rows.append(torch.as_tensor(row, dtype=torch.long, device=host).reshape(-1))
            unit_index.append(u)
    R = len(rows)
    T = max((len(r) for r in rows), default=1)
    input_ids = torch.full((R, T), int(pad_token_id), dtype=torch.long, device=host)
    attention_mask = torch.zeros((R, T), dtype=torch.long, device=host)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    # (R, T), contiguous: Opacus's Embedding sampler needs a real batch dimension on position ids.
    position_ids = torch.arange(T, dtype=torch.long, device=host).unsqueeze(0).repeat(R, 1).contiguous()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "unit_index": torch.tensor(unit_index, dtype=torch.long, device=host)}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def n_units(batch: dict) -> int:
    ui = batch["unit_index"]
    return int(ui.max().item()) + 1 if ui.numel() else 0


def chunks(idxs: Sequence[int], size: int) -> list[list[int]]:
    """The physical batches (at most `size` units each) of one logical batch. An empty logical batch
    is one empty physical batch: a DP step on it still adds noise and is accounted."""
    idxs = list(idxs)
    return [idxs[i: i + size] for i in range(0, len(idxs), size)] or [[]]


def shuffled_batches(n_units: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Non-DP logical batches from step `start` on: uniform shuffles, epoch e's permutation drawn from
    the stream `seeds.torch_generator(seed, "sampling", e)` only, so resuming at any step reproduces the
    same order without extra state."""
    per_epoch = -(-n_units // batch_size)
    s = start
    while True:
        epoch, pos = divmod(s, per_epoch)
        gen = seeds.torch_generator(seed, "sampling", epoch)
        perm = torch.randperm(n_units, generator=gen, device=gen.device)  # host sampling, never the default device
        yield perm[pos * batch_size: (pos + 1) * batch_size].tolist()
        s += 1


# --------------------------------------------------------------------------- the loss
def lm_labels(batch: dict) -> torch.Tensor:
    """Unshifted labels (HF convention, `-100` = no target): `batch["labels"]`, else the input ids with
    padding (`attention_mask == 0`) ignored."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return labels


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R,) mean next-token cross-entropy over each row's real tokens (0 for a one-token row).

    `logits` (R, T, V) are the model's outputs at every position, `labels` (R, T) unshifted.
    Position t is scored against label t+1; the last position has no target. Rather than slicing
    the logits to T-1 positions (a strided view that `reshape` would copy, R*T*V floats, and whose
    backward scatters back into a zero tensor of the same size), the targets are shifted left and
    padded with `IGNORE_INDEX`: the cross-entropy of each position depends on its own row of logits
    only, so every loss term and every gradient is bit-for-bit what the sliced form gives (test), at
    no copy of the logits.
    """
    rows, width = labels.shape
    if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: take the loss in float32
        logits = logits.float()
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)
    ce = F.cross_entropy(logits.reshape(rows * width, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(rows, width)[:, :-1]
    n = (targets[:, :-1] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return ce.sum(dim=1) / n


def per_row_loss(model, batch: dict) -> torch.Tensor:
    """(R,) `row_losses` of the model on a collated batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return row_losses(out.logits, batch["labels"])


def per_unit_loss(model, batch: dict) -> torch.Tensor:
    """(U,) per-unit loss = sum of the unit's per-row losses (HF's batch mean would weight by tokens)."""
    rows = per_row_loss(model, batch)
    return torch.zeros(n_units(batch), dtype=rows.dtype, device=rows.device).index_add(0, batch["unit_index"], rows)
