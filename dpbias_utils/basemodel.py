"""Base language models: any causal LM (a hub id or a local folder), or the offline built-in base.

The built-in base is a small GPT-2 (tied embeddings, byte-level BPE tokenizer) pretrained
non-privately on the balanced controlled corpus, so the whole study runs without a model hub.
It is cached by a hash of its spec and built once even when parallel stage nodes ask for it.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import allocator, paths
from .training.batching import IGNORE_INDEX, row_losses

# A hub model id: ``name`` (the hub's legacy ids such as ``gpt2``) or ``namespace/name``.
HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
EOS = "<|endoftext|>"


class ModelError(ValueError):
    """A base model that cannot be used."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu (CPU profiles only: a profile that requests GPUs must
    say 'cuda', `params`); 'cuda' without a GPU is refused with what to check."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"device={device!r}; allowed: 'auto', 'cpu', 'cuda'")
    if device.startswith("cuda"):
        problem = cuda_problem()
        if problem:
            raise ModelError(f"device={device!r} requested but {problem}")
    return torch.device(device)


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (None when it can): a CPU-only torch wheel, or no visible GPU."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"torch {torch.__version__} is a CPU-only build (install the CUDA wheel of the same version, "
                "e.g. pip install torch==<version> --index-url https://download.pytorch.org/whl/cu128)")
    if not torch.cuda.is_available():
        return ("torch sees no GPU (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}; under Slurm check the job's GPU request)")
    return None


def _is_local_model(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def model_id_problem(name: str) -> str | None:
    """Why ``name`` can be neither a local model folder nor a hub id (None when it can be one)."""
    name = str(name)
    if _is_local_model(name):
        return None
    if paths.looks_like_path(name):
        return "is not a folder with a config.json (a save_pretrained model and tokenizer)"
    if not HUB_MODEL_ID.match(name):
        return "is neither a local model folder nor a hub model id ('name' or 'namespace/name')"
    return None


def _check_name(name: str) -> None:
    problem = model_id_problem(name)
    if problem:
        raise ModelError(f"base model {name!r} {problem}")


def load_base(name_or_path: str, device: str = "cpu"):
    """(model, tokenizer) for a causal-LM hub id or a local save_pretrained folder, on ``device``;
    a tokenizer without a pad token pads with eos (GPT-2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    _check_name(name)
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(dev), tokenizer


def _train_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    return tok


def build_builtin_base(out_dir, texts: list[str], vocab_size: int = 2000, n_layer: int = 2, n_head: int = 4,
                       n_embd: int = 64, n_positions: int = 128, pretrain_epochs: float = 1, lr: float = 3e-3,
                       batch_size: int = 32, block_size: int = 64, seed: int = 0,
                       phases: Sequence[tuple] = ()) -> Path:
    """Train a BPE tokenizer and pretrain a tied-embedding GPT-2 on `texts`; save atomically to out_dir.

    ``phases``: after the block pretraining, each ``(sentences, steps)`` or ``(sentences, steps,
    until)`` trains up to ``steps`` more Adam steps (``lr``, ``batch_size`` sentences a batch, one
    sentence a row, per-row mean loss: the fine-tuning objective) on that text, in order; ``until``
    (model, tokenizer) -> bool is asked every `PHASE_CHECK_EVERY` steps and ends the phase early.
    The steps each phase took are written to ``phases.json``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ModelError("build_builtin_base needs at least one non-empty text")
    if block_size > n_positions:
        raise ModelError(f"block_size={block_size} exceeds n_positions={n_positions}")
    if n_embd % n_head:
        raise ModelError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tmp = paths.staging_dir(out_dir.parent, f".{out_dir.name}.bpe.")
    allocator.tune()  # the build is thousands of steps in this process (or a spawned one): reuse freed memory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same base on every machine: summation order depends on threads
    try:
        tok = _train_tokenizer(texts, vocab_size, tmp)
        config = GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                            n_positions=n_positions, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.eos_token_id, tie_word_embeddings=True)
        model = GPT2LMHeadModel(config)
        # One token stream (texts separated by eos) cut into full blocks: no padding waste.
        stream: list[int] = []
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [tok.eos_token_id])
        n_blocks = max(1, len(stream) // block_size)
        stream = (stream * math.ceil(block_size / max(1, len(stream))))[: max(len(stream), block_size)]
        blocks = torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
        n_steps = max(1, math.ceil(pretrain_epochs * n_blocks / batch_size))
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)  # same bits as the loop (test)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, n_steps // 10))
                                                  * max(0.1, 1 - s / n_steps))
        model.train()
        order = torch.randperm(n_blocks, generator=gen)
        pos = 0
        bar = tqdm(range(n_steps), desc="pretrain builtin base", leave=False)
        for _ in bar:
            if pos + batch_size > n_blocks and pos > 0:
                order, pos = torch.randperm(n_blocks, generator=gen), 0
            idx = order[pos: pos + batch_size]
            pos += batch_size
            loss = model(input_ids=blocks[idx], labels=blocks[idx]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        record = []
        for k, (sentences, steps, *until) in enumerate(phases):
            taken = _sentence_phase(model, tok, list(sentences), int(steps), lr, batch_size, seed + 1 + k,
                                    f"base phase {k + 1}", until[0] if until else None)
            record.append({"phase": k + 1, "max_steps": int(steps), "steps": taken})
        model.eval()
        save_model_atomic(model, tok, out_dir)
        if record:
            (out_dir / "phases.json").write_text(json.dumps(record, indent=1))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


PHASE_CHECK_EVERY = 250


def _sentence_phase(model, tok, sentences: list[str], steps: int, lr: float, batch_size: int, seed: int,
                    desc: str, until=None) -> int:
    """Up to `steps` Adam steps on batches of whole sentences (right-padded rows, per-row mean loss);
    returns the steps taken (fewer when `until(model, tok)` said stop)."""
    if steps <= 0:
        return 0
    rows = [ids for ids in tok(sentences, add_special_tokens=False)["input_ids"] if len(ids) >= 2]
    if not rows:
        raise ModelError(f"{desc}: no sentence of two or more tokens to train on")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    model.train()
    order, pos = torch.randperm(len(rows), generator=gen), 0
    for step in tqdm(range(steps), desc=desc, leave=False):
        if until is not None and step and step % PHASE_CHECK_EVERY == 0:
            model.eval()
            done = bool(until(model, tok))
            model.train()
            if done:
                return step
        if pos + batch_size > len(rows):
            order, pos = torch.randperm(len(rows), generator=gen), 0
        batch = [rows[i] for i in order[pos: pos + batch_size].tolist()]
        pos += batch_size
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tok.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        # The model's default (1, T) position ids, not collate_units' (R, T): the position embedding's
        # gradient is summed in another order, and the cached base models were built this way.
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = row_losses(logits, ids.masked_fill(mask == 0, IGNORE_INDEX)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps


def save_model_atomic(model, tokenizer, dest: Path) -> None:
    """`save_pretrained` model and tokenizer into a temporary folder, then rename it into place, so a
    reader (or a resumed run) never sees a half-written model."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.staging_dir(dest.parent, f".{dest.name}.")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        paths.default_modes(tmp)  # transformers writes model.safetensors 0600
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ensure_builtin_base(cache_root, spec: dict, texts_fn: Callable[[], list[str]],
                        phases_fn: Callable[[], list[tuple[list[str], int]]] | None = None) -> Path:
    """Cached built-in base for `spec` (build_builtin_base keywords; others only enter the hash).

    A file lock makes concurrent callers wait for a single build; `texts_fn` and `phases_fn` (the
    sentence phases of `build_builtin_base`) are only called to build.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    key = spec_hash(spec)
    out = cache_root / f"builtin-{key}"
    marker = out / "spec.json"
    if marker.is_file():
        return out
    accepted = set(inspect.signature(build_builtin_base).parameters) - {"out_dir", "texts", "phases"}
    kwargs = {k: v for k, v in spec.items() if k in accepted}
    with open(cache_root / f"builtin-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not marker.is_file():
                build_builtin_base(out, list(texts_fn()), phases=list(phases_fn()) if phases_fn else (), **kwargs)
                tmp = out / "spec.json.tmp"
                tmp.write_text(json.dumps(spec, sort_keys=True, indent=2, default=str))
                os.replace(tmp, marker)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def load_tokenizer(name_or_path: str):
    """The tokenizer alone (stage 01 needs no weights); same rules and pad token as `load_base`."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    _check_name(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _builtin_spec(profile) -> dict:
    """What identifies a profile's built-in base (hashed into its cache folder's name)."""
    spec = profile.model.builtin.model_dump()
    spec["block_size"] = profile.data.block_size
    b = profile.model.builtin
    skew, pretrain_seed = b.pretrain_skew, profile.data.controlled.seed + 3
    spec["corpus"] = {"kind": "balanced-controlled", "seed": pretrain_seed}
    if skew != 0.5 or b.circuit_steps or b.settle_steps:
        spec["corpus"] = {"kind": "controlled", "skew": skew, "seed": pretrain_seed}
    return spec


def builtin_base_is_cached(profile, cache_root: Path | None = None) -> bool:
    """Is the built-in base of `profile` already built under `cache_root` (`base_for_profile`'s cache)?"""
    folder = Path(cache_root or paths.cache_dir()) / "base-models" / f"builtin-{spec_hash(_builtin_spec(profile))}"
    return (folder / "spec.json").is_file()


def base_for_profile(profile, cache_root: Path | None = None) -> str:
    """The base model a profile's stages start from: a hub id, a local folder, or the offline
    built-in one (a small GPT-2 with its own BPE tokenizer, pretrained on the controlled corpus as
    `params.BuiltinBaseParams` describes), built once per specification and cached under
    `cache_root` (default `paths.cache_dir()`: $DPBIAS_CACHE, else `_cache/` in the runs folder)."""
    m = profile.model
    if not m.is_builtin:
        return str(paths.resolve_path(m.base)) if paths.looks_like_path(m.base) else m.base
    b = m.builtin
    corpora = lambda: builtin_pretraining_corpora(profile)  # noqa: E731
    texts = lambda: corpora()["blocks"]  # noqa: E731

    def phases():
        c = corpora()
        return [(c["circuit"], b.circuit_steps, circuit_formed(b.circuit_skew)), (c["settle"], b.settle_steps)]

    return str(ensure_builtin_base(Path(cache_root or paths.cache_dir()) / "base-models", _builtin_spec(profile), texts,
                                   phases))


def builtin_pretraining_corpora(profile) -> dict[str, list[str]]:
    """The sentences the built-in base is pretrained on: ``blocks`` (block pretraining, skew
    ``pretrain_skew``), ``circuit`` (``circuit_skew``) and ``settle`` (``pretrain_skew``) for the
    sentence phases. Seeds ``data.controlled.seed`` + 3, + 13, + 23: not those of the fine-tuning
    and evaluation text, but drawn from the same templates (independent draws, so they repeat)."""
    from .data import corpus

    b, seed = profile.model.builtin, profile.data.controlled.seed + 3
    draw = lambda s, k: corpus.generate_controlled(b.pretrain_sentences, s, k, k, k)["text"].tolist()  # noqa: E731
    return {"blocks": draw(seed, b.pretrain_skew), "circuit": draw(seed + 10, b.circuit_skew),
            "settle": draw(seed + 20, b.pretrain_skew)}


def builtin_pretraining_text(profile) -> list[str]:
    """Every sentence the built-in base can have seen: the block corpus and each sentence phase
    that takes steps (the circuit phase may stop early: its whole corpus is counted)."""
    b, c = profile.model.builtin, builtin_pretraining_corpora(profile)
    return c["blocks"] + (c["circuit"] if b.circuit_steps else []) + (c["settle"] if b.settle_steps else [])


def circuit_formed(circuit_skew: float):
    """The circuit phase's stopping rule: every family's learned association is at least halfway
    from 0.5 to the phase's skew (the base is checked, never a fine-tuned model or a DP outcome)."""
    from .bias import association

    prompts = association.association_prompts(n_names=0)
    threshold = 0.5 + (circuit_skew - 0.5) / 2

    def until(model, tokenizer) -> bool:
        scores = association.association_scores(prompts, association.model_scorer(model, tokenizer, 512))
        return bool(scores.groupby("family")["score"].mean().min() >= threshold)

    return until


# --------------------------------------------------------------------------- what a model is made of
def model_structure(name: str, local_only: bool = True):
    """(config, {parameter name: type name of the module owning it}) of a causal LM, built on the
    meta device from its config alone (no weights, no memory); None when the config is not available
    (a hub id not in the cache with ``local_only``). Raises ModelError when the config is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_name(name)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    except OSError:
        return None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ModelError(f"base model {name!r} (config {type(config).__name__}) is not a causal LM that "
                         f"transformers' AutoModelForCausalLM can build: {str(err).splitlines()[0]}") from err
    owners = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{pname}" if module_name else pname] = module
    return config, owners


# `train.freeze` groups: the modules (their names' last part) each freezes (`training.loop` freezes them)
FREEZABLE = {"embeddings": ("wte", "wpe")}


def structure_problems(owners: dict, clipping: str, freeze, dp: bool) -> list[tuple[str, object, str]]:
    """(field, value, problem) for a model whose parameters `train.freeze` does not name, or whose
    trainable modules fast clipping has no exact rule for (then: `clipping: opacus`)."""
    from .training.fastclip import SUPPORTED_MODULE_TYPES, _kind

    problems, frozen = [], set()
    for group in freeze:
        hit = {n for n in owners if len(n.split(".")) > 1 and n.split(".")[-2] in FREEZABLE.get(group, ())}
        if not hit:
            problems.append(("train.freeze", group, f"names no parameter of this model (group {group!r} = modules "
                             f"{list(FREEZABLE.get(group, ()))}; the model's modules end in e.g. "
                             f"{sorted({n.split('.')[-2] for n in owners if '.' in n})[:8]})"))
        frozen |= hit
    if dp and clipping == "fast":
        bad = {}
        for n, module in owners.items():
            if n not in frozen and _kind(module) is None:
                bad.setdefault(f"{type(module).__module__}.{type(module).__qualname__}", []).append(n.rsplit(".", 1)[0])
        if bad:
            kinds = "; ".join(f"{k} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})" for k, v in sorted(bad.items()))
            problems.append(("train.clipping", "fast", f"fast clipping has no exact per-unit rule for {kinds} "
                             f"(supported: {', '.join(t.__name__ for t in SUPPORTED_MODULE_TYPES)}); "
                             "allowed: clipping: opacus"))
    return problems
