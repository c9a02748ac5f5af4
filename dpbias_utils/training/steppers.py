"""One class per way of training, behind one interface.

A stepper owns everything that differs between ways of training: how logical batches are drawn,
how a physical batch's gradient is formed, and what one optimizer step does (clipping, noise,
accounting). The loop (`loop.train`) only moves batches through it::

    stepper = make_stepper("fast", model, optimizer, dataset, plan)
    for pb in stepper.batches(start_step):      # physical batches; pb.last ends a logical batch
        losses, norms = stepper.backward(pb)    # per-unit losses, per-unit gradient norms (DP) or None
        if pb.last:
            stepper.step()                      # one optimizer step (+ noise and accounting for DP)

`stepper.accountant` is the Opacus accountant of a DP stepper (None for non-DP); `state_dict` /
`load_state_dict` carry what a checkpoint needs to resume bit-exactly.

Random streams (`seeds`): `sampler_gen` draws the units of each batch, `noise_gen` the Gaussian noise.
With `plan.noise == "reproducible"` both derive from the recorded `plan.seed` (a simulation of DP:
anyone with the config regenerates every batch and every noise vector); with "secret" (the default)
from 128 bits of the OS CSPRNG drawn when the stepper is built and never written. Reproducible:
torch's own generators (mt19937 on CPU, Philox on CUDA) seeded with 63 bits of the stream; secret:
the same generators with their whole state set from the stream (`secret_rng`: no integer seed, which
torch would cut to 64 or, on CPU, 32 bits), and a secret DP stepper also sets torch's global
generators from the stream "dropout", so dropout masks are secret too.
Non-DP shuffles always follow the recorded seed (`batching.shuffled_batches`): nothing is private.

Precision: every stepper computes in float32 (no autocast), so DP and non-DP runs differ only in
sampling, clipping and noise, never in arithmetic.

* `NonDP`: uniformly shuffled batches, the mean of the per-unit losses over the logical batch.
* `OpacusDP`: Opacus hooks (per-row gradients summed per unit), Opacus's DPOptimizer clips, noises
  and accounts; Poisson sampling of units.
* `FastDP`: exact per-unit clipping without per-example gradients (`fastclip.clipped_grad_sum`), the
  clipped sum noised, averaged and accounted by Opacus's `DPOptimizerFastGradientClipping`.
* Ablations of FastDP (issue 16; `methods` says which is private): `ClipOnly` (no noise), `NoiseOnly`
  (no clipping), `GlobalScaling` (C/max(Z, ||g||)), `GlobalAdapt` (Z moved by a private noisy count).

A new way of training is a subclass registered under a name (`@register`); DP variants that only
change the clipping (`FastDP.clip`) or the noise (`plan.sigma`, `FastDP.noise_multiplier`) override
one method.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator, NamedTuple

import torch

from ..seeds import NOISE_MODES, Streams
from . import fastclip
from .batching import TrainingError, UnitDataset, chunks, n_units, per_unit_loss, shuffled_batches, to_device
from .dp_hooks import _hf_module, dp_backward, per_sample_norms, prepare_dp
from .privacy import PrivacyError


@dataclass(frozen=True)
class Plan:
    """The numbers a run is planned with (all steppers read the same plan)."""

    n_units: int
    steps: int
    logical_batch_size: int
    physical_batch_size: int
    lr: float
    seed: int
    device: torch.device
    max_grad_norm: float
    accountant: str
    sigma: float | None = None        # noise multiplier (DP)
    delta: float | None = None        # DP
    global_z: "GlobalZ | None" = None  # the `global` / `global-adapt` steppers' threshold Z and its update
    noise: str = "secret"             # NOISE_MODES: where the sampling and noise streams come from

    @property
    def dp(self) -> bool:
        return self.sigma is not None

    @property
    def sample_rate(self) -> float:
        return self.logical_batch_size / self.n_units

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n_units // self.logical_batch_size)

    @property
    def expected_batch_size(self) -> float:
        """Expected units per Poisson batch, the denominator of a DP step."""
        return self.sample_rate * self.n_units


@dataclass(frozen=True)
class GlobalZ:
    """DPSGD-Global's threshold Z (fixed before any run, from no data) and, for Global-Adapt, its
    private update (Andrew et al. 2021): with b = (sum_B (1[||g_u|| <= Z] - 1/2) + N(0, count_noise^2))
    / E|B| + 1/2 the noisy fraction of units at or below Z, Z <- Z exp(-z_lr (b - quantile)).
    count_noise None: E|B| / 20 (Andrew et al.'s recommendation)."""

    z: float
    quantile: float = 0.9
    z_lr: float = 0.2
    count_noise: float | None = None


class Physical(NamedTuple):
    """One physical batch on the device; `last` ends its logical batch of `n_logical` units (None:
    not known to the loop, the stepper's optimizer keeps count)."""

    batch: dict
    last: bool
    n_logical: int | None


class Stepper(ABC):
    """Set up from (model, optimizer, dataset, plan); see the module docstring for the protocol."""

    name: ClassVar[str]
    dp: ClassVar[bool] = True   # draws Poisson batches and noise: needs a plan with sigma and delta
    private: ClassVar[bool] = True  # earns the plan's (epsilon, delta); False: epsilon is infinite
    reduce_stats = None         # distributed steppers: sums a tensor over the processes (steps.csv)

    def __init__(self, model, optimizer: torch.optim.Optimizer, dataset: UnitDataset, plan: Plan):
        self.model, self.optimizer, self.dataset, self.plan = model, optimizer, dataset, plan
        self.streams = private_streams(plan)
        self.sampler_gen = self.streams.generator("sampling")
        self.noise_gen = self.streams.generator("noise", device=plan.device)
        if self.streams.secret and self.dp:  # dropout masks from the secret too (`secret_rng.seed_dropout`)
            self.streams.seed_dropout(plan.device)
        self.accountant = None

    @property
    def module(self):
        """The HF model being trained (inside any wrapper): what is saved and checkpointed."""
        return self.model

    @abstractmethod
    def batches(self, start_step: int) -> Iterator[Physical]:
        """Physical batches from logical step `start_step` on (endless)."""

    @abstractmethod
    def backward(self, pb: Physical) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradient of one physical batch: returns (per-unit losses, per-unit gradient norms or None)."""

    @abstractmethod
    def step(self) -> None:
        """One optimizer step on the logical batch just completed."""

    def epsilon(self) -> float | None:
        """Epsilon spent so far by the accountant's record (None for non-DP)."""
        if self.accountant is None:
            return None
        if self.plan.sigma == 0 or not self.private:  # no noise, or noise without a sensitivity bound
            return math.inf
        return float(self.accountant.get_epsilon(delta=self.plan.delta)) if len(self.accountant.history) else 0.0

    def _physical(self, logical: Iterable[Iterable[int]]) -> Iterator[Physical]:
        for idxs in logical:
            parts = chunks(idxs, self.plan.physical_batch_size)
            for j, part in enumerate(parts):
                yield Physical(to_device(self.dataset.batch(part), self.plan.device), j == len(parts) - 1,
                               sum(len(p) for p in parts))

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "accountant": self.accountant.state_dict() if self.accountant is not None else None,
                "sampler_gen": self.sampler_gen.get_state(), "noise_gen": self.noise_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.sampler_gen.set_state(state["sampler_gen"])
        self.noise_gen.set_state(state["noise_gen"])


def check_noise_mode(noise) -> None:
    if noise not in NOISE_MODES:
        raise TrainingError(f"noise={noise!r} is not a noise mode; allowed: {', '.join(NOISE_MODES)}")


def private_streams(plan: Plan) -> Streams:
    """The streams of the sampling and noise generators: the recorded seed's (`reproducible`), or a
    fresh CSPRNG secret (`secret`), never stored."""
    check_noise_mode(plan.noise)
    return Streams.secret_draw() if plan.noise == "secret" else Streams.replicate(plan.seed)


STEPPERS: dict[str, type[Stepper]] = {}


def register(cls: type[Stepper]) -> type[Stepper]:
    """Class decorator: make `cls` available to `make_stepper` under `cls.name`."""
    STEPPERS[cls.name] = cls
    return cls


def stepper_class(name: str) -> type[Stepper]:
    if name not in STEPPERS:
        raise TrainingError(f"training method {name!r} does not exist; allowed: {', '.join(STEPPERS)}")
    return STEPPERS[name]


def make_stepper(name: str, model, optimizer, dataset: UnitDataset, plan: Plan) -> Stepper:
    cls = stepper_class(name)
    if plan.dp != cls.dp:
        raise TrainingError(f"training method {name!r} needs a plan {'with' if cls.dp else 'without'} noise")
    return cls(model, optimizer, dataset, plan)


# --------------------------------------------------------------------------- the ways of training
@register
class NonDP(Stepper):
    """Uniformly shuffled logical batches; loss = mean over the logical batch of the per-unit losses.
    float32 like the DP steppers (no autocast on any device: precision is not a difference between
    the conditions)."""

    name = "nondp"
    dp = False
    private = False

    def batches(self, start_step: int) -> Iterator[Physical]:
        p = self.plan
        return self._physical(shuffled_batches(p.n_units, p.logical_batch_size, p.seed, start_step))

    def backward(self, pb: Physical):
        losses = per_unit_loss(self.model, pb.batch)
        (losses.sum() / pb.n_logical).backward()
        return losses.detach(), None

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _DPOptimizerStepper(Stepper):
    """A DP stepper whose `dp_opt` (an Opacus DPOptimizer) accumulates physical batches and does the
    noisy, accounted step at the end of each logical batch. Unless a BatchMemoryManager does it
    (`signals_skips` False), the stepper tells the optimizer which physical batches to accumulate."""

    _dp_opt = None
    signals_skips = True

    @property
    def dp_opt(self):
        return self._dp_opt

    @dp_opt.setter
    def dp_opt(self, optimizer) -> None:
        """Every DP optimizer a stepper installs: in `secret` mode with Opacus's `secure_mode` noise
        (each coordinate the mean of 4 Gaussians scaled by 1/2 after one discarded draw: the same
        N(0, (sigma C)^2), robust to the floating-point attacks of Mironov 2012 / Jin et al. 2022 on
        a released sum); `reproducible` mode keeps one draw per coordinate (a simulation anyway)."""
        optimizer.secure_mode = self.plan.noise == "secret"
        self._dp_opt = optimizer

    def _accumulate(self, pb: Physical) -> None:
        """Fold a physical batch that does not end its logical batch into the optimizer's clipped sum."""
        if not pb.last:
            if self.signals_skips:
                self.dp_opt.signal_skip_step(do_skip=True)
            self.dp_opt.step()  # skipped by Opacus: clips and accumulates only
            self.dp_opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.dp_opt.step()
        self.dp_opt.zero_grad(set_to_none=True)


@register
class OpacusDP(_DPOptimizerStepper):
    """Opacus hooks: per-row gradients summed per unit (`dp_backward`), Opacus's DPOptimizer clips each
    unit to C, adds N(0, (sigma C)^2) and divides by the expected batch; Poisson batches of units are
    split into physical batches by Opacus's BatchMemoryManager."""

    name = "opacus"
    signals_skips = False  # BatchMemoryManager signals them

    def __init__(self, model, optimizer, dataset, plan):
        super().__init__(model, optimizer, dataset, plan)
        self.gsm, self.dp_opt, self.loader, engine = prepare_dp(
            model, optimizer, dataset, noise_multiplier=plan.sigma, max_grad_norm=plan.max_grad_norm,
            sample_rate=plan.sample_rate, accountant=plan.accountant, generator=self.sampler_gen,
            noise_generator=self.noise_gen)
        self.accountant = engine.accountant
        self.params = list(self.dp_opt.params)

    @property
    def module(self):
        return _hf_module(self.gsm)

    def batches(self, start_step: int) -> Iterator[Physical]:
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.plan.physical_batch_size,
                                optimizer=self.dp_opt) as mem_loader:
            # Iterate the splitting sampler directly: a DataLoader iterator would draw a base seed
            # from the sampling generator and break bit-exact resumption.
            bs = mem_loader.batch_sampler
            while True:
                for idxs in bs:
                    last = not self.dp_opt._check_skip_next_step(pop_next=False)
                    yield Physical(to_device(self.dataset.batch(idxs), self.plan.device), last, None)

    def backward(self, pb: Physical):
        losses = dp_backward(self.gsm, pb.batch, self.params)
        norms = per_sample_norms(self.params).detach() if n_units(pb.batch) else None
        self._accumulate(pb)
        return losses, norms


@register
class FastDP(_DPOptimizerStepper):
    """Exact per-unit clipping in one forward and one backward (`fastclip.clipped_grad_sum`: ghost
    norms + book-keeping), Poisson sampling of units (Opacus's UniformWithReplacementSampler on the
    sampling generator), and Opacus's `DPOptimizerFastGradientClipping` (in its copy-free, bit-identical
    form, `fastclip.make_dp_optimizer`) for the rest: it sums the
    physical batches' clipped sums, adds N(0, (sigma C)^2) from the noise generator, divides by the
    expected batch size and steps the accountant. That optimizer gives bit-identical parameters to the
    hand-written noise draw it replaced (same `torch.normal` call on the same generator, same
    division), which the project's bit-identity check showed on CPU runs.

    The logged per-unit losses come from the clipping pass's own forward (the dropout masks of the
    gradient; no second forward).

    Variants (issue 16): clip-only = `noise_multiplier` 0; noise-only = `clip` with C = inf and the
    noise at sigma C; global scaling = `clip` with its own clip factors.
    """

    name = "fast"

    def __init__(self, model, optimizer, dataset, plan):
        from opacus.accountants import create_accountant

        super().__init__(model, optimizer, dataset, plan)
        self.accountant = create_accountant(mechanism=plan.accountant)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp_opt = fastclip.make_dp_optimizer(
            optimizer, noise_multiplier=self.noise_multiplier(), max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.expected_batch_size, generator=self.noise_gen)
        self.dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))

    def noise_multiplier(self) -> float:
        """sigma of the noise N(0, (sigma C)^2) added to each logical batch's clipped sum."""
        return self.plan.sigma

    def batches(self, start_step: int) -> Iterator[Physical]:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        p = self.plan
        return self._physical(UniformWithReplacementSampler(num_samples=p.n_units, sample_rate=p.sample_rate,
                                                            generator=self.sampler_gen, steps=10**12))

    def unit_factor(self):
        """c(norms) -> (U,): the weight of each unit's gradient in the sum (here min(1, C/||g_u||))."""
        return fastclip.clip_factor(self.plan.max_grad_norm)

    def clip(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Set every trainable p.grad to sum_u c_u g_u (`unit_factor`); return the per-unit norms and
        the per-unit losses of the same forward, both (U,)."""
        for p in self.params:
            p.grad = None
        return fastclip.scaled_grad_sum(self.model, batch, self.unit_factor(), with_losses=True)

    def backward(self, pb: Physical):
        if n_units(pb.batch):
            norms, losses = self.clip(pb.batch)  # one forward: norms and losses, on the model's device
            norms = norms.detach().reshape(-1)
        else:  # an empty Poisson batch: nothing to add, the step still noises and is accounted
            for p in self.params:
                p.grad = torch.zeros_like(p)
            losses, norms = torch.zeros(0, device=self.plan.device), None
        self._accumulate(pb)
        return losses, norms


# --------------------------------------------------------------------------- ablations (issue 16)
@register
class ClipOnly(FastDP):
    """FastDP without noise: (sum_B min(1, C/||g_u||) g_u) / E|B|. Not private (epsilon infinite)."""

    name = "clip-only"
    private = False

    def noise_multiplier(self) -> float:
        return 0.0


@register
class NoiseOnly(FastDP):
    """FastDP without clipping: (sum_B g_u + N(0, (sigma C)^2)) / E|B|, sigma the multiplier calibrated
    for the run's epsilon as if clipped at C. Not private: an unclipped gradient has no sensitivity
    bound, so the same noise buys no (epsilon, delta)."""

    name = "noise-only"
    private = False

    def unit_factor(self):
        return fastclip.unit_factor_one


@register
class GlobalScaling(FastDP):
    """DPSGD-Global (Esipova et al. 2023's scaling): c_u = C / max(Z, ||g_u||), so units at or below Z
    keep their relative sizes (all scaled by C/Z) and those above are clipped to C. Every ||c_u g_u||
    <= C, so the noise N(0, (sigma C)^2) buys the same privacy as dp-adam (Z fixed from no data)."""

    name = "global"

    def __init__(self, model, optimizer, dataset, plan):
        if plan.global_z is None:
            raise TrainingError(f"training method {self.name!r} needs plan.global_z (the threshold Z)")
        self.z = float(plan.global_z.z)
        super().__init__(model, optimizer, dataset, plan)

    def unit_factor(self):
        return fastclip.global_factor(self.plan.max_grad_norm, self.z)

    def privacy_notes(self) -> dict:
        """For privacy.json: the threshold Z at the end of the run and the noise on the gradient sum."""
        return {"global_z_final": self.z, "gradient_noise_multiplier": self.dp_opt.noise_multiplier}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "global_z": self.z}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.z = float(state["global_z"])


def adapt_noise(sigma: float, count_noise: float) -> float:
    """Gradient noise multiplier of Global-Adapt: sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2).

    Per unit, the step releases its scaled gradient (norm <= C, noise sigma_g C) and its centred
    indicator 1[||g_u|| <= Z] - 1/2 (sensitivity 1/2, noise sigma_b). Divided by their noise, the
    two coordinates have sensitivity^2 sigma_g^-2 + (2 sigma_b)^-2 = sigma^-2: one Gaussian mechanism
    with multiplier sigma on the same Poisson batch, so the calibrated sigma is what is accounted
    (Andrew et al. 2021, Theorem 1). Needs 2 sigma_b > sigma."""
    if not (count_noise > 0 and 2 * count_noise > sigma > 0):
        raise PrivacyError(f"global count noise sigma_b={count_noise!r} must exceed sigma/2 = {sigma / 2:.4g} "
                           "(the calibrated noise multiplier / 2) for Global-Adapt's gradient noise to exist; "
                           "raise train.global_count_noise")
    return (sigma ** -2 - (2 * count_noise) ** -2) ** -0.5


@register
class GlobalAdapt(GlobalScaling):
    """DPSGD-Global-Adapt: GlobalScaling whose Z follows the `quantile` of the unit norms through a
    private noisy count (`GlobalZ`); the gradient noise is raised to `adapt_noise(sigma, sigma_b)` so
    that gradient and count together are the Gaussian mechanism of multiplier sigma that the
    accountant records. Z and the running count are part of the checkpoint."""

    name = "global-adapt"

    def __init__(self, model, optimizer, dataset, plan):
        g = plan.global_z
        self.count_noise = float(g.count_noise if g is not None and g.count_noise is not None
                                 else plan.expected_batch_size / 20)
        self.count = 0.0  # sum over this logical batch of 1[||g_u|| <= Z] - 1/2
        super().__init__(model, optimizer, dataset, plan)
        self.dp_opt.attach_step_hook(self._account)  # replaces FastDP's: sigma, not sigma_g, is what is spent

    def noise_multiplier(self) -> float:
        return adapt_noise(self.plan.sigma, self.count_noise)

    def privacy_notes(self) -> dict:
        return {**super().privacy_notes(), "count_noise": self.count_noise,
                "accounting": "gradient (noise gradient_noise_multiplier * C) and centred count (sensitivity 1/2, "
                              "noise count_noise) accounted together as one Gaussian of multiplier noise_multiplier"}

    def _account(self, _optimizer) -> None:
        self.accountant.step(noise_multiplier=self.plan.sigma, sample_rate=self.plan.sample_rate)

    def clip(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        norms, losses = super().clip(batch)
        self.count += float(((norms.double() + 1e-6 <= self.z).double() - 0.5).sum())
        return norms, losses

    def step(self) -> None:
        g = self.plan.global_z
        noisy = self.count + float(torch.normal(0.0, self.count_noise, (1,), generator=self.noise_gen,
                                                device=self.plan.device).item())
        b = noisy / self.plan.expected_batch_size + 0.5
        super().step()  # the gradient step uses the Z its units were scaled with
        self.z = self.z * math.exp(-g.z_lr * (b - g.quantile))
        self.count = 0.0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "global_count": self.count}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.count = float(state["global_count"])
