"""Stage 02: fine-tuning with and without differential privacy, one loop for both.

Privacy unit = one original text chunk (`unit_id`); in CDA `augment` mode its counterfactual row
belongs to the same unit. DP training (Opacus hooks, DP-Adam) Poisson-samples *units*, sums the
per-row gradients of each unit before clipping, clips each unit to `max_grad_norm`, adds Gaussian
noise sigma*C calibrated for the planned number of steps, and divides by the expected logical
batch. Non-DP training uses the same batching and per-unit loss with uniformly shuffled batches.

Runs checkpoint atomically and resume bit-exactly (CPU); a finished run (marker file) is never
retrained. The epsilon reported is the one the accountant recorded, re-checked independently.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import grad_samplers  # noqa: F401  (registers the Conv1D per-sample gradient)
from .progress import tqdm
from .basemodel import load_base, resolve_device, save_model_atomic
from .privacy import PrivacyError, calibrate_noise, default_delta, epsilon_spent

CLIPPING_MODES = ("opacus", "fast")
DONE_FILE = "DONE.json"
STEPS_COLUMNS = ["step", "epoch", "loss", "epsilon_spent", "clip_fraction", "grad_norm_q10", "grad_norm_q50",
                 "grad_norm_q90", "lr", "n_units_in_batch"]
PRIVACY_UNIT = ("one original text chunk (unit_id) of at most block_size tokens; in CDA augment mode its "
                "counterfactual row belongs to the same unit and is sampled and clipped with it")


class TrainingError(ValueError):
    """Training arguments that cannot be run."""


# --------------------------------------------------------------------------- batching
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
        for uid, grp in order.groupby("unit_id", sort=True):
            rows = [torch.as_tensor(np.asarray(ids, dtype=np.int64)) for ids in grp["input_ids"]]
            if any(len(r) == 0 for r in rows):
                raise TrainingError(f"unit {uid} has an empty token row")
            self.unit_ids.append(int(uid))
            self.units.append(rows)
        self.n_rows = sum(len(u) for u in self.units)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.units[i]


def collate_units(items: Sequence[Sequence], pad_token_id: int) -> dict:
    """Pad the rows of a list of units into one batch; `unit_index[r]` = position of row r's unit."""
    rows, unit_index = [], []
    for u, item in enumerate(items):
        for row in item:
            rows.append(torch.as_tensor(row, dtype=torch.long).reshape(-1))
            unit_index.append(u)
    R = len(rows)
    T = max((len(r) for r in rows), default=1)
    input_ids = torch.full((R, T), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    # (R, T), contiguous: Opacus's Embedding sampler needs a real batch dimension on position ids.
    position_ids = torch.arange(T, dtype=torch.long).unsqueeze(0).repeat(R, 1).contiguous()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "unit_index": torch.tensor(unit_index, dtype=torch.long)}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _n_units(batch: dict) -> int:
    ui = batch["unit_index"]
    return int(ui.max().item()) + 1 if ui.numel() else 0


def per_row_loss(model, batch: dict) -> torch.Tensor:
    """(R,) mean next-token cross-entropy over each row's real tokens (0 for a one-token row)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1, :]
    targets = batch["labels"][:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: take the loss in float32
        logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=-100, reduction="none").view(targets.shape)
    n = (targets != -100).sum(dim=1).clamp(min=1)
    return ce.sum(dim=1) / n


def per_unit_loss(model, batch: dict) -> torch.Tensor:
    """(U,) per-unit loss = sum of the unit's per-row losses (HF's batch mean would weight by tokens)."""
    rows = per_row_loss(model, batch)
    U = _n_units(batch)
    return torch.zeros(U, dtype=rows.dtype, device=rows.device).index_add(0, batch["unit_index"], rows)


# --------------------------------------------------------------------------- DP machinery
def _hf_module(model):
    """The HF model inside an Opacus GradSampleModule (or the model itself)."""
    return getattr(model, "_module", model)


def prepare_dp(model, optimizer, dataset: UnitDataset, *, noise_multiplier: float, max_grad_norm: float,
               sample_rate: float, accountant: str = "prv", generator: torch.Generator | None = None,
               noise_generator: torch.Generator | None = None):
    """Opacus hooks + DP optimizer + Poisson loader over units, with our exact sample rate.

    Opacus derives q = 1/len(loader), which float rounding can shift; we build the Poisson loader
    with q ourselves and attach the accountant hook and expected batch size with that same q.
    Returns (gsm, dp_optimizer, dp_loader, engine).
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    if not 0 < sample_rate < 1:
        raise PrivacyError(f"sample_rate={sample_rate} must lie in (0, 1)")
    hf = _hf_module(model)
    tied = _is_tied(hf)
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator,
                          collate_fn=lambda items: collate_units(items, dataset.pad_token_id))
    engine = PrivacyEngine(accountant=accountant)
    gsm, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=False, loss_reduction="mean", grad_sample_mode="hooks",
        noise_generator=noise_generator)
    dp_opt.expected_batch_size = sample_rate * len(dataset)
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    if tied and not _is_tied(_hf_module(gsm)):
        raise TrainingError("make_private broke the tie between input embeddings and the LM head")
    return gsm, dp_opt, dp_loader, engine


def _is_tied(hf) -> bool:
    try:
        return hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    except AttributeError:
        return False


def dp_backward(gsm, batch: dict, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Forward/backward one physical batch with Opacus hooks; leave per-UNIT grads in p.grad_sample.

    Opacus hooks yield one gradient per row; rows of a unit are summed (index_add over unit_index)
    so the optimizer clips, and the sampler samples, whole units. An empty Poisson batch gets
    zero-length per-sample gradients so the step still adds noise and is accounted.
    Returns the detached per-unit losses (U,).
    """
    params = [p for p in params if p.requires_grad]
    R = batch["input_ids"].shape[0]
    if R == 0:
        for p in params:
            p.grad_sample = torch.zeros((0,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        return torch.zeros(0)
    losses = per_unit_loss(gsm, batch)
    # loss_reduction="mean": Opacus rescales backprops by R, so per-sample grads are d(row loss).
    with warnings.catch_warnings():  # the embedding's full backward hook has no input grads: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        (losses.sum() / R).backward()
    U = losses.shape[0]
    if U != R:
        for p in params:
            if isinstance(p.grad_sample, list):
                raise TrainingError("per-sample gradients were accumulated over several backward passes")
            p.grad_sample = sum_rows_per_unit(p.grad_sample, batch["unit_index"], U)
    return losses.detach()


def sum_rows_per_unit(gs: torch.Tensor, unit_index: torch.Tensor, n_units: int) -> torch.Tensor:
    """(R, ...) per-row tensors -> (U, ...) per-unit sums.

    collate_units keeps a unit's rows adjacent, so this gathers the j-th row of every unit and
    adds (exact, and far faster on CPU than index_add_ over a large trailing shape); any other
    layout falls back to index_add_.
    """
    ui = unit_index
    counts = torch.bincount(ui, minlength=n_units)
    if ui.numel() and bool((ui[1:] >= ui[:-1]).all()) and bool((counts > 0).all()):
        starts = torch.cumsum(counts, 0) - counts
        out = gs.index_select(0, starts)
        for j in range(1, int(counts.max())):
            sel = (counts > j).nonzero().squeeze(1)
            out[sel] = out[sel] + gs.index_select(0, starts[sel] + j)
        return out
    return gs.new_zeros((n_units,) + tuple(gs.shape[1:])).index_add_(0, ui, gs)


def per_sample_norms(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """(U,) L2 norm of each unit's full gradient, from p.grad_sample (same formula Opacus clips with)."""
    norms = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1) for p in params if p.requires_grad]
    return torch.stack(norms, dim=1).norm(2, dim=1)


# --------------------------------------------------------------------------- helpers
def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _frame_fingerprint(df) -> str:
    h = hashlib.sha256()
    for uid, ids in zip(df["unit_id"], df["input_ids"]):
        h.update(np.int64(uid).tobytes())
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _write_steps_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STEPS_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k])
                        for k in STEPS_COLUMNS})
    os.replace(tmp, path)


def _quantiles(x: torch.Tensor) -> tuple[float, float, float]:
    if x.numel() == 0:
        return (math.nan, math.nan, math.nan)
    q = torch.quantile(x.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double))
    return tuple(float(v) for v in q)


def _progress_steps(points: Sequence[int], steps: int) -> dict[int, int]:
    out = {}
    for p in sorted(set(int(p) for p in points)):
        if not 0 <= p <= 100:
            raise TrainingError(f"progress point {p} must lie in [0, 100]")
        out[p] = int(round(p / 100 * steps))
    return out


def _fastclip():
    try:
        from . import fastclip
    except ImportError:
        return None
    return fastclip if hasattr(fastclip, "clipped_grad_sum") else None


FREEZABLE = {"embeddings": ("wte", "wpe")}


def _freeze(model, groups: Sequence[str]) -> None:
    """Freeze parameter groups (``embeddings``: token and position embeddings; with GPT-2's tied head
    the output embedding too). Frozen parameters get no gradient, no clipping share and no noise."""
    for group in groups:
        if group not in FREEZABLE:
            raise TrainingError(f"freeze={group!r}; allowed: {', '.join(FREEZABLE)}")
        for name, p in model.named_parameters():
            if name.split(".")[-2] in FREEZABLE[group]:
                p.requires_grad_(False)


# --------------------------------------------------------------------------- train
def train(base_path: str, train_df, out_dir, *, epsilon: float | None, max_grad_norm: float = 0.1,
          delta: float | None = None, accountant: str = "prv", epochs: float = 1.0, logical_batch_size: int = 64,
          physical_batch_size: int = 32, lr: float = 1e-3, seed: int = 0, checkpoint_every: int = 50,
          device: str = "auto", clipping: str = "opacus", progress_points: Sequence[int] = (0, 25, 50, 100),
          dropout: float | None = None, freeze: Sequence[str] = (),
          on_step: Callable[[int], None] | None = None) -> dict:
    """Fine-tune `base_path` on `train_df` (DP when `epsilon` is a number, non-DP when None).

    Writes model/, progress/pct_<p>/, checkpoints/, steps.csv, privacy.json and a DONE.json marker
    into out_dir and returns the result dict (the recorded one if the run had already finished).
    `on_step(step)` is called after every optimizer step and checkpoint (a progress/fault hook).
    """
    out_dir = Path(out_dir)
    done = out_dir / DONE_FILE
    request = {"base_path": str(base_path), "data": _frame_fingerprint(train_df), "epsilon": epsilon,
               "max_grad_norm": max_grad_norm, "delta": delta, "accountant": accountant, "epochs": epochs,
               "logical_batch_size": logical_batch_size, "physical_batch_size": physical_batch_size, "lr": lr,
               "seed": seed, "clipping": clipping, "dropout": dropout}
    if freeze:
        request["freeze"] = sorted(freeze)
    if done.is_file():
        recorded = json.loads(done.read_text())
        if recorded.get("request") != json.loads(json.dumps(request, default=_json_default)):
            raise TrainingError(f"{out_dir} holds a finished run with different settings "
                                f"({recorded.get('request')}); use another out_dir")
        return recorded
    dp = epsilon is not None
    if clipping not in CLIPPING_MODES:
        raise TrainingError(f"clipping={clipping!r}; allowed: {', '.join(CLIPPING_MODES)}")
    fast = None
    if clipping == "fast":
        fast = _fastclip()
        if fast is None:
            raise TrainingError("clipping='fast' needs dpbias_utils.fastclip.clipped_grad_sum, which is not "
                                "available; use clipping='opacus'")
        if not dp:
            raise TrainingError("clipping='fast' only applies to DP runs (epsilon is None)")
    if dp and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError(f"epsilon={epsilon!r} must be a positive finite number (None = non-DP)")
    for name, v in (("logical_batch_size", logical_batch_size), ("physical_batch_size", physical_batch_size),
                    ("checkpoint_every", checkpoint_every)):
        if not (isinstance(v, int) and v > 0):
            raise TrainingError(f"{name}={v!r} must be a positive integer")
    if not (epochs > 0 and lr > 0 and max_grad_norm > 0):
        raise TrainingError(f"epochs={epochs}, lr={lr}, max_grad_norm={max_grad_norm} must all be positive")
    if dropout is not None and not 0 <= dropout < 1:
        raise TrainingError(f"dropout={dropout} must lie in [0, 1)")

    dev = resolve_device(device)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model, tokenizer = load_base(base_path, device=str(dev))
    if dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = float(dropout)
        for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if hasattr(model.config, k):
                setattr(model.config, k, float(dropout))
    _freeze(model, freeze)
    model.train()
    dataset = UnitDataset(train_df, pad_token_id=tokenizer.pad_token_id)
    n_units = len(dataset)
    batches_per_epoch = math.ceil(n_units / logical_batch_size)
    steps = max(1, int(round(epochs * n_units / logical_batch_size)))
    sample_rate = logical_batch_size / n_units

    sigma = None
    if dp:
        delta = default_delta(n_units) if delta is None else float(delta)
        if sample_rate >= 1:
            raise PrivacyError(f"{n_units} privacy units are too few for a logical batch of {logical_batch_size} "
                               f"(sample rate {sample_rate:.3g} >= 1): use more units or a smaller batch")
        sigma = calibrate_noise(float(epsilon), delta, sample_rate, steps, accountant)

    config = {**request, "delta": delta, "steps": steps, "noise_multiplier": sigma}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    ckpt_path = ckpt_dir / "last.pt"
    progress = _progress_steps(progress_points, steps)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sampler_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    engine = gsm = dp_opt = None
    if dp and clipping == "opacus":
        gsm, dp_opt, dp_loader, engine = prepare_dp(
            model, optimizer, dataset, noise_multiplier=sigma, max_grad_norm=max_grad_norm, sample_rate=sample_rate,
            accountant=accountant, generator=sampler_gen, noise_generator=noise_gen)
        params = [p for p in dp_opt.params]
    elif dp:
        from opacus.accountants import create_accountant
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        acct = create_accountant(mechanism=accountant)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    hf = _hf_module(gsm if gsm is not None else model)

    # ---- resume
    step, rows, resumed_from = 0, [], None
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != config:
            raise TrainingError(f"checkpoint {ckpt_path} belongs to a different configuration; delete it to restart")
        hf.load_state_dict(ck["model"])
        (dp_opt.original_optimizer if dp_opt is not None else optimizer).load_state_dict(ck["optimizer"])
        if engine is not None:
            engine.accountant.load_state_dict(ck["accountant"])
        elif dp:
            acct.load_state_dict(ck["accountant"])
        sampler_gen.set_state(ck["sampler_gen"])
        noise_gen.set_state(ck["noise_gen"])
        _set_rng_state(ck["rng"])
        step, rows, resumed_from = int(ck["step"]), list(ck["rows"]), int(ck["step"])
    if 0 in progress and not (out_dir / "progress" / "pct_0").is_dir() and step == 0:
        save_model_atomic(hf, tokenizer, out_dir / "progress" / "pct_0")

    def accountant_obj():
        return engine.accountant if engine is not None else (acct if dp else None)

    def current_eps() -> float | None:
        if not dp:
            return None
        a = accountant_obj()
        return float(a.get_epsilon(delta=delta)) if len(a.history) else 0.0

    def save_checkpoint():
        _atomic_torch_save({
            "config": config, "step": step, "rows": rows, "model": hf.state_dict(),
            "optimizer": (dp_opt.original_optimizer if dp_opt is not None else optimizer).state_dict(),
            "accountant": accountant_obj().state_dict() if dp else None,
            "sampler_gen": sampler_gen.get_state(), "noise_gen": noise_gen.get_state(), "rng": _rng_state()},
            ckpt_path)
        _write_steps_csv(rows, out_dir / "steps.csv")

    eps_every = max(10, steps // 20)  # PRV epsilon costs ~0.5 s; also at checkpoints and the end
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if (not dp and dev.type == "cuda") else nullcontext())
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="train non-DP" if epsilon is None else f"train eps={epsilon:g}",
               unit="step")
    last_eps = rows[-1]["epsilon_spent"] if rows else (0.0 if dp else None)

    def physical_batches():
        """Yields (batch, is_last_of_logical_step, n_units_in_logical_batch)."""
        if dp and clipping == "opacus":
            from opacus.utils.batch_memory_manager import BatchMemoryManager

            with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical_batch_size,
                                    optimizer=dp_opt) as mem_loader:
                # Iterate the splitting sampler directly: a DataLoader iterator would draw a base seed
                # from the sampling generator and break bit-exact resumption.
                bs = mem_loader.batch_sampler
                while True:
                    for idxs in bs:
                        last = not dp_opt._check_skip_next_step(pop_next=False)
                        yield collate_units([dataset[i] for i in idxs], dataset.pad_token_id), last, None
        elif dp:
            sampler = UniformWithReplacementSampler(num_samples=n_units, sample_rate=sample_rate,
                                                    generator=sampler_gen, steps=10**12)
            for idxs in sampler:
                chunks = [idxs[i: i + physical_batch_size] for i in range(0, len(idxs), physical_batch_size)] or [[]]
                for j, c in enumerate(chunks):
                    yield collate_units([dataset[i] for i in c], dataset.pad_token_id), j == len(chunks) - 1, len(idxs)
        else:
            # Uniform shuffled batches; epoch e's permutation depends on (seed, e) only, so resuming
            # at any step reproduces the same order without extra state.
            s = step
            while True:
                epoch, pos = divmod(s, batches_per_epoch)
                perm = torch.randperm(n_units, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
                idxs = perm[pos * logical_batch_size: (pos + 1) * logical_batch_size].tolist()
                chunks = [idxs[i: i + physical_batch_size] for i in range(0, len(idxs), physical_batch_size)]
                for j, c in enumerate(chunks):
                    yield collate_units([dataset[i] for i in c], dataset.pad_token_id), j == len(chunks) - 1, len(idxs)
                s += 1

    unit_losses, unit_norms, n_in_batch = [], [], 0
    if fast is not None:
        summed = [torch.zeros_like(p) for p in params]
    batches = physical_batches()
    try:
        while step < steps:
            batch, last, n_logical = next(batches)
            batch = _to(batch, dev)
            U = _n_units(batch)
            n_in_batch += U
            if dp and clipping == "opacus":
                losses = dp_backward(gsm, batch, params)
                if U:
                    unit_norms.append(per_sample_norms(params).detach())
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
            elif dp:
                if U:
                    for p in params:
                        p.grad = None
                    norms = fast.clipped_grad_sum(model, batch, max_grad_norm)
                    unit_norms.append(torch.as_tensor(norms).detach().reshape(-1))
                    for s_, p in zip(summed, params):
                        if p.grad is not None:
                            s_.add_(p.grad)
                    with torch.no_grad():
                        losses = per_unit_loss(model, batch)
                else:
                    losses = torch.zeros(0)
                if last:
                    with torch.no_grad():
                        for s_, p in zip(summed, params):
                            # Same draw as Opacus's DPOptimizer (non-secure mode), same generator.
                            noise = torch.normal(mean=0, std=sigma * max_grad_norm, size=p.shape, device=p.device,
                                                 generator=noise_gen)
                            p.grad = (s_ + noise) / (sample_rate * n_units)
                            s_.zero_()
                    optimizer.step()
                    acct.step(noise_multiplier=sigma, sample_rate=sample_rate)
                    optimizer.zero_grad(set_to_none=True)
            else:
                with autocast:
                    losses = per_unit_loss(model, batch)
                (losses.sum() / n_logical).backward()
                losses = losses.detach()
                if last:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            unit_losses.append(losses.float().cpu())
            if not last:
                continue

            step += 1
            all_losses = torch.cat(unit_losses) if unit_losses else torch.zeros(0)
            norms = torch.cat(unit_norms) if unit_norms else torch.zeros(0)
            eps_now = dp and (step % eps_every == 0 or step == steps or step % checkpoint_every == 0)
            if eps_now:
                last_eps = current_eps()
            q10, q50, q90 = _quantiles(norms)
            rows.append({
                "step": step, "epoch": step * sample_rate if dp else step / batches_per_epoch,
                "loss": float(all_losses.mean()) if all_losses.numel() else math.nan,
                "epsilon_spent": last_eps if eps_now else (math.nan if dp else None),
                "clip_fraction": float((norms > max_grad_norm).double().mean()) if (dp and norms.numel()) else math.nan,
                "grad_norm_q10": q10, "grad_norm_q50": q50, "grad_norm_q90": q90,
                "lr": lr, "n_units_in_batch": n_in_batch})
            unit_losses, unit_norms, n_in_batch = [], [], 0
            bar.update(1)
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", eps="inf" if not dp else f"{last_eps:.2f}")
            for p_, s_ in progress.items():
                if s_ == step and p_ != 0:
                    save_model_atomic(hf, tokenizer, out_dir / "progress" / f"pct_{p_}")
            if step % checkpoint_every == 0 or step == steps:
                save_checkpoint()
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        batches.close()

    # ---- finish: the accountant's record must match the plan and the independent computation
    eps_final = None
    if dp:
        a = accountant_obj()
        hist = list(a.history)
        if sum(h[2] for h in hist) != steps or any((h[0], h[1]) != (sigma, sample_rate) for h in hist):
            raise PrivacyError(f"accountant history {hist} does not match the plan ({steps} steps, sigma={sigma}, "
                               f"q={sample_rate})")
        recorded = rows[-1]["epsilon_spent"] if rows else None  # computed from the accountant at the last step
        eps_final = (float(recorded) if isinstance(recorded, float) and math.isfinite(recorded)
                     else float(a.get_epsilon(delta=delta)))
        eps_indep = epsilon_spent(sigma, sample_rate, steps, delta, accountant)
        if not (eps_final <= epsilon and eps_indep <= epsilon):
            raise PrivacyError(f"epsilon spent {eps_final} (independent {eps_indep}) exceeds the target {epsilon}")
    save_model_atomic(hf, tokenizer, out_dir / "model")
    _write_steps_csv(rows, out_dir / "steps.csv")
    privacy = {"epsilon_target": epsilon, "epsilon_spent": eps_final, "delta": delta, "noise_multiplier": sigma,
               "sample_rate": sample_rate if dp else None, "steps": steps, "n_units": n_units,
               "n_rows": dataset.n_rows, "expected_batch_size": sample_rate * n_units if dp else None,
               "logical_batch_size": logical_batch_size, "accountant": accountant if dp else None,
               "max_grad_norm": max_grad_norm if dp else None, "clipping": clipping if dp else None,
               "privacy_unit": PRIVACY_UNIT,
               "note": None if dp else "non-private training: epsilon is infinite, recorded as null"}
    _atomic_json(privacy, out_dir / "privacy.json")
    result = {"request": request, "out_dir": str(out_dir), "model_dir": str(out_dir / "model"), "dp": dp, "steps": steps,
              "epsilon_target": epsilon, "epsilon_spent": eps_final, "delta": delta, "noise_multiplier": sigma,
              "sample_rate": sample_rate if dp else None, "n_units": n_units,
              "final_loss": rows[-1]["loss"] if rows else None, "resumed_from": resumed_from,
              "wall_seconds": time.time() - t0, "device": str(dev)}
    _atomic_json(result, done)
    return result
