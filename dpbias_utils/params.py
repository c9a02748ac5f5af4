"""Typed schema of a study profile (`params/*.yaml`), validated before any work starts.

A profile has sections that mirror the stages (`data`, `model`, `train`, `gradnorms`,
`evaluation`), a `grid` (a list of blocks; each block is the cartesian product of its lists, the
grid is their union) and `execution` (local / Slurm resources). Every error names the file, the
field, the value and what is allowed; `ParamsError` carries all of them.

Relative paths in a profile are resolved against the repository root (so `../shared/data/...`
means the folder beside the checkout), then checked to exist.
"""
from __future__ import annotations

import math

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import paths
from .training.methods import METHODS, default_method, method_problem

BUILTIN = "builtin"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]
OpenUnitFloat = Annotated[float, Field(gt=0, lt=1)]
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  (the registry's names)


class ParamsError(ValueError):
    """A profile that cannot be run; `messages` holds one line per problem."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------- data (stage 01)
class ControlledCorpusParams(Section):
    """The embedded, seeded stereotype corpus; skew = P(stereotype-consistent attribute)."""

    n_train_sentences: PositiveInt = 6000
    n_eval_sentences: PositiveInt = 1500
    skew_occupation: UnitFloat = 0.9
    skew_sentiment: UnitFloat = 0.8
    skew_toxicity: UnitFloat = 0.8
    neutral_fraction: UnitFloat = 0.2
    nonbinary_fraction: UnitFloat = 0.0
    seed: int = 1234


class TextCorpusParams(Section):
    """A real corpus: a hub dataset id ``namespace/name`` (``config`` null unless the dataset has
    several) or local .txt/.jsonl/.csv/.parquet files (one per split in a folder, or one file cut by
    ``split_fractions``), rows in ``text_column``."""

    source: str = "Salesforce/wikitext"
    config: Optional[str] = None
    text_column: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    # {eval_split or test_split: fraction}: cut one local file into splits by a hash of each row's
    # text (`corpus.assign_split`); the rest is train_split. Needed when source is one file.
    split_fractions: Optional[dict[str, UnitFloat]] = None
    max_train_rows: Optional[PositiveInt] = None
    max_eval_rows: Optional[PositiveInt] = None


class DataParams(Section):
    corpus: Literal["controlled", "text"] = "controlled"
    controlled: ControlledCorpusParams = ControlledCorpusParams()
    text: TextCorpusParams = TextCorpusParams()
    block_size: PositiveInt = 64
    swap_names: bool = False
    max_train_units: Optional[PositiveInt] = None


# --------------------------------------------------------------------------- model
class BuiltinBaseParams(Section):
    """Size of the offline base GPT-2 the project pretrains on the balanced controlled corpus."""

    vocab_size: PositiveInt = 2000
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 64
    n_positions: PositiveInt = 128
    pretrain_sentences: PositiveInt = 20000
    pretrain_epochs: PositiveFloat = 1.0
    # Skew of the pretraining corpus (every family): 0.5 = balanced; above 0.5 the base carries a
    # mild association of its own, as a pretrained LM does.
    pretrain_skew: UnitFloat = 0.5
    # Sentence-level phases after the block pretraining (0 steps: none). A model this small forms
    # the subject-gender -> attribute circuit only after ~1,000 steps of a strong signal, and when
    # is a matter of chance, so the base first sees up to `circuit_steps` steps of text at
    # `circuit_skew`, stopping once every family's association is halfway from 0.5 to that skew
    # (checked every 250 steps), then `settle_steps` steps of text at `pretrain_skew`, which leaves
    # it the pretraining corpus's mild association with the circuit in place.
    circuit_skew: UnitFloat = 0.9
    circuit_steps: Annotated[int, Field(ge=0)] = 0
    settle_steps: Annotated[int, Field(ge=0)] = 0
    lr: PositiveFloat = 3e-3
    batch_size: PositiveInt = 32
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        return self


class ModelParams(Section):
    base: str = BUILTIN
    builtin: BuiltinBaseParams = BuiltinBaseParams()

    @property
    def is_builtin(self) -> bool:
        """The offline built-in base (`basemodel.base_for_profile` builds it) rather than a hub id or a folder."""
        return self.base == BUILTIN


# --------------------------------------------------------------------------- training (stage 02)
class DPRule(Section):
    """What DP runs do differently from non-DP runs (each None: the value of `train`). A rule fixed
    before any run, never tuned on a bias outcome: DP trades steps for privacy, so it gets a larger
    logical batch (signal grows with the batch, noise does not) and its own step count."""

    logical_batch_size: Optional[PositiveInt] = None
    physical_batch_size: Optional[PositiveInt] = None
    epochs: Optional[PositiveFloat] = None
    lr: Optional[PositiveFloat] = None


class TrainParams(Section):
    epochs: PositiveFloat = 1.0
    lr: PositiveFloat = 1e-3
    logical_batch_size: PositiveInt = 64
    physical_batch_size: PositiveInt = 32
    max_grad_norm: PositiveFloat = 0.1
    delta: Optional[OpenUnitFloat] = None  # None: 1 / N**1.1, N = number of privacy units
    accountant: Literal["prv", "rdp"] = "prv"
    # "fast": exact ghost-norm + book-keeping clipping (dpbias_utils.training.fastclip), proven equal to the
    # explicit per-unit loop and to Opacus hooks by tests/training/test_fastclip.py; "opacus": Opacus hooks.
    clipping: Literal["opacus", "fast"] = "fast"
    # "secret": DP sampling and noise from a CSPRNG secret drawn at run time and never written (a private
    # release); "reproducible": from the replicate seed (study replicates: a simulation of DP, not a private
    # release). training.loop's docstring; privacy.json records the mode.
    noise: Literal["secret", "reproducible"] = "secret"
    checkpoint_every: PositiveInt = 50
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_points: list[Annotated[int, Field(ge=0, le=100)]] = [0, 25, 50, 100]
    freeze: list[Literal["embeddings"]] = []   # parameter groups not trained (DP and non-DP alike)
    dp: DPRule = DPRule()
    # Ablation methods (grid `method`, `dpbias_utils.training.methods`); each is read only by the methods
    # that use it, and only those runs' ids depend on it (`METHOD_TRAIN_KEYS`). Rules fixed before any run,
    # never tuned on a bias outcome:
    # sgd_lr: dp-sgd's SGD learning rate (the `lr`s above are Adam's); required when the grid has dp-sgd.
    sgd_lr: Optional[PositiveFloat] = None
    # global_z: DPSGD-Global's threshold Z (units at or below Z are scaled by C/Z, above it clipped to C),
    # and Global-Adapt's starting Z. Chosen from no data: it must not be read off stage 03's norms.
    global_z: PositiveFloat = 1.0
    # Global-Adapt (Andrew et al. 2021): Z follows the `global_quantile` of the unit gradient norms,
    # Z <- Z exp(-global_z_lr (b - global_quantile)), b the noisy fraction of units at or below Z whose
    # count noise has std `global_count_noise` (null: expected batch / 20, Andrew et al.'s choice).
    global_quantile: OpenUnitFloat = 0.9
    global_z_lr: PositiveFloat = 0.2
    global_count_noise: Optional[PositiveFloat] = None

    def for_run(self, dp: bool, method: str | None = None, n_scale: float = 1.0) -> dict:
        """epochs, lr, logical and physical batch of one run: DP runs (every method but nondp: they all
        draw Poisson batches) take `dp`'s values where set; dp-sgd's lr is `sgd_lr`.

        ``n_scale`` = N / N_ref, a grid `n_units` over the data section's N (`n_scale_of`). The rule that
        keeps "how far a run gets" comparable across N: a Poisson-sampled run's logical batch is scaled by
        N / N_ref, so its sampling rate q = B / N and its step count (epochs x N / B) stay those of the
        reference (at a fixed epsilon, sigma depends only on q, steps and delta, and delta = 1/N^1.1 moves
        it little); its physical batch is capped at the new logical batch. A non-DP run keeps its batch and
        scales its epochs by N_ref / N, so it takes the reference's number of steps (the calibration rule
        checks it still learns the data). Learning rates are unchanged."""
        out = {k: getattr(self, k) for k in ("epochs", "lr", "logical_batch_size", "physical_batch_size")}
        poisson = dp or (method is not None and method != "nondp")
        if poisson:
            out.update({k: v for k, v in self.dp.model_dump().items() if v is not None})
        if method is not None and METHODS[method].optimizer == "sgd":
            out["lr"] = self.sgd_lr
        if n_scale != 1.0:
            if poisson:
                out["logical_batch_size"] = max(1, int(round(out["logical_batch_size"] * n_scale)))
                out["physical_batch_size"] = min(out["physical_batch_size"], out["logical_batch_size"])
            else:
                out["epochs"] = out["epochs"] / n_scale
        return out

    @field_validator("progress_points")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must list at least one percentage")
        return sorted(set(v))


# --------------------------------------------------------------------------- stage 03
class GradNormParams(Section):
    max_units_per_split: Optional[PositiveInt] = 200
    batch_size: PositiveInt = 16
    n_boot: PositiveInt = 1000


# --------------------------------------------------------------------------- stage 04
class EvaluationParams(Section):
    """Bias evaluation; `None` sources mean the embedded controlled-corpus variant."""

    prompt_sets: list[str] = ["controlled"]
    bold_source: Optional[str] = None
    max_prompts_per_group: Optional[PositiveInt] = None
    k: PositiveInt = 4
    max_new_tokens: PositiveInt = 16
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 50
    temperature: PositiveFloat = 1.0
    batch_size: PositiveInt = 32
    toxicity_backend: Literal["profanity", "detoxify"] = "profanity"
    toxicity_checkpoint: Optional[str] = None
    stereoset_source: Optional[str] = None
    crows_pairs_source: Optional[str] = None
    toxicity_config_path: Optional[str] = None   # local Detoxify/HF config folder (offline Detoxify)
    occupation_table: Optional[str] = None       # None: the project's table; or a TSV/CSV path
    local_bias_max_pairs: Optional[PositiveInt] = None
    stereotype_max_items: Optional[PositiveInt] = None
    metrics: list[str] = [
        "association", "toxicity", "sentiment", "occupation", "gender_count", "local_bias", "perplexity", "stereotype",
    ]
    association_names: Annotated[int, Field(ge=0)] = 8   # first-name pairs in the association prompts
    perplexity_bos: bool = False   # also score every split's first token after <|endoftext|> (female/male always are)
    n_boot: PositiveInt = 1000

    @field_validator("prompt_sets", "metrics")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must not be empty")
        return v


# --------------------------------------------------------------------------- grid and execution
class GridBlock(Section):
    """One cartesian block; `epsilon: null` is the non-DP condition. `method` (optional): the ways of
    training (`dpbias_utils.training.methods`), crossed with the rest; when absent, nondp for
    `epsilon: null` and dp-adam for a number. A method that needs an epsilon (dp-*, noise-only,
    global*) takes the numbers of `epsilon`, one that does not (nondp, clip-only) takes `null`."""

    epsilon: list[Optional[PositiveFloat]]
    mixing_ratio: list[UnitFloat] = [0.0]
    cda_mode: list[Literal["substitute", "augment"]] = ["substitute"]
    seed: list[int] = [0]
    max_grad_norm: Optional[list[PositiveFloat]] = None
    method: Optional[list[MethodName]] = None
    # skew (optional): the planted skew of every family of the controlled corpus (occupation, sentiment,
    # toxicity) for these points' stage 01 and everything downstream; absent: the `data` section's skews.
    skew: Optional[list[UnitFloat]] = None
    # The regime map (`params/regimes.yaml`, `results.regimes`). base_skew (optional): the built-in base's own
    # association, as the skew of its pretraining and settle corpora (`model.builtin.pretrain_skew`); each
    # value is its own base, built by the same phases and cached by its parameters. n_units (optional): the
    # number of privacy units N (the controlled corpus's training sentences), with the training rule scaled
    # so DP keeps its sampling rate q and step count and non-DP its step count (`TrainParams.for_run`).
    # Absent: the model and data sections' values (today's ids stay).
    base_skew: Optional[list[UnitFloat]] = None
    n_units: Optional[list[PositiveInt]] = None

    @field_validator("epsilon", "mixing_ratio", "cda_mode", "seed", "max_grad_norm", "method", "skew", "base_skew",
                     "n_units")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("grid lists must not be empty")
        return v


class StageResources(Section):
    gpus: Annotated[int, Field(ge=0)] = 0
    cpus: PositiveInt = 2
    mem_gb: PositiveInt = 8
    time_min: PositiveInt = 60
    partition: Optional[str] = None    # this stage's Slurm partition (else execution.slurm_partition)


class ExecutionParams(Section):
    slurm_partition: Optional[str] = None
    # How a job asks for its GPUs: `--gpus-per-node=N` or `--gres=gpu:N` (clusters differ; some refuse one).
    slurm_gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    resources: dict[Literal["01", "02", "03", "04", "05"], StageResources] = {}
    # Slurm options used by `dpbias run --executor slurm` (dpbias_utils.pipeline.slurm); none changes a node's id.
    slurm_array_parallelism: Optional[PositiveInt] = None  # at most this many tasks of a stage's array at once
    slurm_additional_parameters: dict[str, str | int] = {}  # extra sbatch flags: {account: x, qos: y}
    slurm_setup: list[str] = []        # shell lines run before each job (module load ..., source venv)
    slurm_poll_s: PositiveFloat = 10.0  # seconds between queue polls while waiting for a stage
    slurm_max_requeue: Annotated[int, Field(ge=0)] = 3  # re-queues after pre-emption / time-out (resumes)


class Profile(Section):
    name: Optional[str] = None
    description: str = ""
    include_base: bool = True
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    gradnorms: GradNormParams = GradNormParams()
    evaluation: EvaluationParams = EvaluationParams()
    grid: list[GridBlock]
    execution: ExecutionParams = ExecutionParams()

    @field_validator("grid")
    @classmethod
    def _grid_nonempty(cls, v):
        if not v:
            raise ValueError("the grid must have at least one block")
        return v

    def points(self) -> list[dict]:
        """Every training condition of the grid, deduplicated, in a stable order."""
        seen, out = set(), []
        for block in self.grid:
            clips = block.max_grad_norm or [self.train.max_grad_norm]
            for eps, ratio, mode, seed, clip, method, skew, base_skew, n_units in itertools.product(
                block.epsilon, block.mixing_ratio, block.cda_mode, block.seed, clips, block.method or [None],
                block.skew or [None], block.base_skew or [None], block.n_units or [None],
            ):
                point = {
                    "epsilon": eps,
                    "mixing_ratio": float(ratio),
                    "cda_mode": mode,
                    "seed": seed,
                    "max_grad_norm": float(clip),
                }
                if method is not None and method != default_method(eps):
                    point["method"] = method  # the default method is left implicit: today's ids stay
                if skew is not None:
                    point["skew"] = float(skew)  # absent: the data section's skews (today's ids stay)
                if base_skew is not None:
                    point["base_skew"] = float(base_skew)  # absent: model.builtin.pretrain_skew
                if n_units is not None:
                    point["n_units"] = int(n_units)  # absent: data.controlled.n_train_sentences
                key = tuple(point.values())
                if key not in seen:
                    seen.add(key)
                    out.append(point)
        return out


# --------------------------------------------------------------------------- loading
# One privacy condition, one name. A profile writes non-DP as `epsilon: null` (None in Python); a node
# id uses the slug "nondp" (`pipeline.graph`); results.csv stores epsilon = inf with dp = False (a
# number column); wherever a person reads it, it is `privacy_label`'s "non-DP" or "DP ε=3".
NON_DP = "non-DP"


# The train keys only some methods read: a run's id depends on them only when its method reads them.
METHOD_TRAIN_KEYS = {"dp-sgd": ("sgd_lr",), "global": ("global_z",),
                     "global-adapt": ("global_z", "global_quantile", "global_z_lr", "global_count_noise")}


def train_keys_of(train: dict, point: dict) -> dict:
    """A dump of the train section without the method-only keys the point's method does not read."""
    used = METHOD_TRAIN_KEYS.get(method_of(point), ())
    unused = {k for keys in METHOD_TRAIN_KEYS.values() for k in keys} - set(used)
    return {k: v for k, v in train.items() if k not in unused}


def planted_skews(data: DataParams, point: dict) -> dict[str, float]:
    """The skew the controlled corpus plants per family at a grid point: the point's `skew` for every
    family when the grid sets one, else the data section's `skew_<family>`."""
    families = [k[len("skew_"):] for k in ControlledCorpusParams.model_fields if k.startswith("skew_")]
    if point.get("skew") is not None:
        return {f: float(point["skew"]) for f in families}
    return {f: getattr(data.controlled, f"skew_{f}") for f in families}


def n_scale_of(data: DataParams, point: dict) -> float:
    """N / N_ref of a grid point: its `n_units` over the data section's `controlled.n_train_sentences`
    (1.0 where the grid sets no `n_units`)."""
    if point.get("n_units") is None:
        return 1.0
    return float(point["n_units"]) / float(data.controlled.n_train_sentences)


def profile_at(profile: "Profile", point: dict) -> "Profile":
    """The profile as one grid point sees it: a grid `base_skew` sets `model.builtin.pretrain_skew` (its own
    base model, same phases, cached by its parameters), a grid `n_units` sets
    `data.controlled.n_train_sentences`. Without either, the profile itself."""
    if point.get("base_skew") is None and point.get("n_units") is None:
        return profile
    model, data = profile.model, profile.data
    if point.get("base_skew") is not None:
        model = model.model_copy(update={"builtin": model.builtin.model_copy(update={"pretrain_skew": float(point["base_skew"])})})
    if point.get("n_units") is not None:
        data = data.model_copy(update={"controlled": data.controlled.model_copy(
            update={"n_train_sentences": int(point["n_units"])})})
    return profile.model_copy(update={"model": model, "data": data})


def method_of(point: dict) -> str:
    """The way of training of a grid point (`Profile.points`): its `method`, else nondp / dp-adam."""
    return point.get("method") or default_method(point.get("epsilon"))


def privacy_label(epsilon) -> str:
    """The readable name of a privacy condition: "non-DP" (None, NaN or inf) or "DP ε=<epsilon>"."""
    if epsilon is None or not math.isfinite(float(epsilon)):
        return NON_DP
    return f"DP ε={float(epsilon):g}"


SECTIONS = ("name", "description", "include_base", "data", "model", "train", "gradnorms", "evaluation", "grid", "execution")

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 would read it as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _section_at(loc: tuple):
    """The schema class that holds the field at `loc` (for listing allowed keys)."""
    import typing

    cls = Profile
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        ann = cls.model_fields[part].annotation
        while typing.get_args(ann) and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            ann = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), typing.get_args(ann)[0])
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _describe_allowed(err: dict) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "extra_forbidden":
        try:
            section = _section_at(err["loc"])
        except (KeyError, AttributeError):
            section = None
        allowed = f": allowed keys here are {sorted(section.model_fields)}" if section else ""
        return f"unknown key{allowed}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
        bound = next(iter(ctx.values()), "?")
        return f"must be {ops[kind]} {bound}"
    if kind == "missing":
        return "is required"
    return err["msg"][0].lower() + err["msg"][1:]


def _field_name(loc: tuple) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "constrained-")):
            continue
        elif part in ("float", "int", "str", "bool", "list[...]", "dict[...]", "none"):
            continue
        else:
            name += ("." if name else "") + str(part)
    return name or "(top level)"


def _value_at(raw: Any, loc: tuple) -> Any:
    cur = raw
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return None if not isinstance(part, str) or part not in ("float", "int", "str", "bool") else cur
    return cur


resolve_path = paths.resolve_path  # one path rule for params, the corpus and the evaluation sources
looks_like_path = paths.looks_like_path


def _check_paths(profile: Profile) -> list[tuple[str, Any, str]]:
    """(field, value, problem) for every local path that does not exist."""
    problems = []
    problems += _check_model(profile)
    if profile.data.corpus == "text":
        problems += _check_text_corpus(profile.data.text)
    ev = profile.evaluation
    for field in ("bold_source", "stereoset_source", "crows_pairs_source", "toxicity_checkpoint",
                  "toxicity_config_path", "occupation_table"):
        value = getattr(ev, field)
        if value and looks_like_path(value) and not resolve_path(value).exists():
            problems.append((f"evaluation.{field}", value, "local path does not exist"))
    if profile.train.physical_batch_size > profile.train.logical_batch_size:
        problems.append(("train.physical_batch_size", profile.train.physical_batch_size,
                         f"must be <= train.logical_batch_size ({profile.train.logical_batch_size})"))
    return (problems + _check_methods(profile) + _check_skews(profile) + _check_regime_axes(profile)
            + _check_device(profile))


def _check_device(profile: Profile) -> list[tuple[str, Any, str]]:
    """A profile that requests GPUs trains on one: `auto` would fall back to the CPU without a word
    (a CPU-only wheel or a missing GPU request) and take months."""
    gpu = sorted(s for s, r in profile.execution.resources.items() if r.gpus > 0)
    if gpu and profile.train.device != "cuda":
        return [("train.device", profile.train.device, f"execution.resources requests GPUs for stage(s) "
                 f"{', '.join(gpu)}; allowed: 'cuda' (a missing GPU is then one error before any work)")]
    return []


def _check_model(profile: Profile) -> list[tuple[str, Any, str]]:
    """(field, value, problem) for a base model that is no causal LM, whose module types the
    clipping path cannot handle, or whose parameters `train.freeze` does not name. Read from its
    config on the meta device (no weights); a hub id whose config is not cached is checked by
    `dpbias prefetch` / `preflight` instead."""
    base = profile.model.base
    if base == BUILTIN:
        return []
    from . import basemodel

    name = str(resolve_path(base)) if looks_like_path(base) else base
    problem = basemodel.model_id_problem(name)
    if problem:
        return [("model.base", base, f"{problem}; allowed: '{BUILTIN}', a hub id or a local model folder")]
    try:
        found = basemodel.model_structure(name)
    except basemodel.ModelError as err:
        return [("model.base", base, str(err))]
    if found is None:
        return []
    dp = any(point["epsilon"] is not None for point in profile.points())
    return basemodel.structure_problems(found[1], profile.train.clipping, profile.train.freeze, dp)


def _check_text_corpus(t: TextCorpusParams) -> list[tuple[str, Any, str]]:
    """(field, value, problem) for a text corpus whose source, splits or split rule cannot work."""
    from .data.corpus import hub_id_problem

    src, problems = t.source, []
    if looks_like_path(src):
        path = resolve_path(src)
        if not path.exists():
            problems.append(("data.text.source", src, "local corpus path does not exist (or give a hub dataset id "
                             "such as 'Salesforce/wikitext')"))
        elif path.is_file() and not t.split_fractions:
            problems.append(("data.text.source", src, "one file would serve as train, validation and test alike; "
                             "allowed: a folder with one file per split, or data.text.split_fractions such as "
                             f"{{{t.eval_split}: 0.05, {t.test_split}: 0.05}}"))
    elif hub_id_problem(src):
        problems.append(("data.text.source", src, hub_id_problem(src)))
    if t.split_fractions:
        bad = sorted(set(t.split_fractions) - {t.eval_split, t.test_split})
        if bad or t.train_split in t.split_fractions:
            problems.append(("data.text.split_fractions", t.split_fractions, f"keys must be data.text.eval_split "
                             f"({t.eval_split!r}) and/or test_split ({t.test_split!r}); the rest is the train split"))
        elif sum(t.split_fractions.values()) >= 1 or set(t.split_fractions) != {t.eval_split, t.test_split}:
            problems.append(("data.text.split_fractions", t.split_fractions, "needs a fraction for both "
                             f"{t.eval_split!r} and {t.test_split!r}, summing to < 1 (the rest is the train split)"))
        elif not looks_like_path(src):
            problems.append(("data.text.split_fractions", t.split_fractions, "cuts one local file into splits; a hub "
                             "dataset has its own splits (drop split_fractions)"))
    return problems


def _check_skews(profile: Profile) -> list[tuple[str, Any, str]]:
    """(field, value, problem) for a grid `skew` on a corpus that plants none (only the controlled one does)."""
    if profile.data.corpus == "controlled":
        return []
    return [(f"grid[{i}].skew", block.skew, f"sets the planted skew of the controlled corpus, but data.corpus is "
             f"{profile.data.corpus!r}; allowed: drop `skew`, or data.corpus: controlled")
            for i, block in enumerate(profile.grid) if block.skew is not None]


def _check_regime_axes(profile: Profile) -> list[tuple[str, Any, str]]:
    """(field, value, problem) for a grid `base_skew` without the built-in base (only it has a pretraining
    skew) or a grid `n_units` on a corpus whose size the profile does not set (only the controlled one)."""
    problems = []
    for i, block in enumerate(profile.grid):
        if block.base_skew is not None and profile.model.base != BUILTIN:
            problems.append((f"grid[{i}].base_skew", block.base_skew, f"sets the built-in base's pretraining skew, but "
                             f"model.base is {profile.model.base!r}; allowed: drop `base_skew`, or model.base: {BUILTIN}"))
        if block.n_units is not None and profile.data.corpus != "controlled":
            problems.append((f"grid[{i}].n_units", block.n_units, f"sets the controlled corpus's size, but data.corpus is "
                             f"{profile.data.corpus!r}; allowed: drop `n_units` (use data.max_train_units), or "
                             "data.corpus: controlled"))
    return problems


def _check_methods(profile: Profile) -> list[tuple[str, Any, str]]:
    """(field, value, problem) for grid methods that cannot run with the block's epsilons or settings."""
    problems = []
    for i, block in enumerate(profile.grid):
        for method in block.method or []:
            for eps in block.epsilon:
                problem = method_problem(method, eps)
                if problem is not None:
                    problems.append((f"grid[{i}].method", method, f"with epsilon {eps!r}: {problem}"))
                    break
            if METHODS[method].optimizer == "sgd" and profile.train.sgd_lr is None:
                problems.append(("train.sgd_lr", None, f"grid[{i}] has method {method!r}, which needs SGD's learning "
                                 "rate (train.lr is Adam's): set train.sgd_lr, fixed before any run"))
    return problems


def parse_profile(raw: Any, source: str = "<params>") -> Profile:
    """Validate an already-loaded mapping; raises ParamsError naming `source`."""
    if not isinstance(raw, dict):
        raise ParamsError([f"{source}: the profile must be a YAML mapping of sections {list(SECTIONS)}, got {type(raw).__name__}"])
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = _field_name(err["loc"])
            value = err.get("input") if err["type"] != "extra_forbidden" else _value_at(raw, err["loc"])
            if err["type"] == "missing":
                lines.append(f"{source}: field '{field}' {_describe_allowed(err)}")
            else:
                lines.append(f"{source}: field '{field}' = {value!r}: {_describe_allowed(err)}")
        raise ParamsError(lines) from None
    problems = _check_paths(profile)
    if problems:
        raise ParamsError([f"{source}: field '{f}' = {v!r}: {why}" for f, v, why in problems])
    if profile.name is None:
        profile.name = Path(source).stem if source != "<params>" else "adhoc"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", profile.name):
        raise ParamsError([f"{source}: field 'name' = {profile.name!r}: must contain only letters, digits, '_', '.', '-'"])
    return profile


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file. Nothing is written, whatever happens."""
    path = Path(path)
    shown = str(path)
    if not path.is_file():
        raise ParamsError([f"{shown}: profile file not found (profiles live in {paths.PARAMS})"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError([f"{shown}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ParamsError([f"{shown}: malformed YAML{where}: {problem}"]) from None
    if raw is None:
        raise ParamsError([f"{shown}: the profile is empty (it needs at least a 'grid')"])
    return parse_profile(raw, shown)

