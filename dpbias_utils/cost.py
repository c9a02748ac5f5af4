"""What a profile's training runs cost: tokens, optimizer steps and GPU hours (`dpbias run --dry-run`).

Per training run (stage 02 node):

* **units N** and **tokens**: from the corpus size. WikiText from the hub: its published size
  (103,227,021 words in the train split, Merity et al. 2017; 1,801,350 rows on the hub) times the
  GPT-2 BPE statistics measured here on the shared WikiText slices (`WIKITEXT_STATS`); a
  ``max_train_rows`` cap scales them down. A local text source is read and counted (tokenised with
  the model's tokenizer when it is available offline, else by characters / 4.57, GPT-2 BPE's
  measured ratio on WikiText). The controlled corpus: ``n_train_sentences`` units x the mean tokens
  of a generated sample. ``max_train_units`` caps N; CDA ``augment`` adds the counterfactual rows
  of gendered units (share measured on the sample / WikiText).
* **steps** = round(epochs x N / logical batch), exactly as `training.train` plans them.
* **compute tokens** = epochs x N x rows per unit x padded length: batches are padded to their
  longest row, so a step costs about (rows x padded length), not the real token count. The padded
  length is the expected longest of ``physical_batch_size`` units (a sample quantile), or the block
  size when no sample exists (hub WikiText: 128-token blocks of ~97-token paragraphs).
* **GPU hours** = compute tokens / throughput, from ``benchmarks/throughput.csv``. A row matching
  (model, mode, device) is used as is; otherwise the nearest row is scaled, and the line says from
  what: another model on the same device by training FLOPs per token (6 x parameters + attention,
  Kaplan et al. 2020), another GPU by the ratio of peak fp32 FLOP/s (every stepper, DP and non-DP,
  runs in float32). ``source`` in the table says whether a row was measured (CPU here,
  or `benchmarks/gpu_check.sh` on a GPU) or is an assumption.

Only stage 02 (training) is estimated in hours; the other stages are listed with their node counts
and Slurm time limits.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import paths
from .params import BUILTIN, Profile, looks_like_path, method_of, resolve_path

THROUGHPUT_CSV = paths.REPO_ROOT / "benchmarks" / "throughput.csv"

# WikiText on the hub (Salesforce/wikitext): rows per split (all rows, empty ones included) and words
# (Merity et al. 2017, Table 1). The raw and tokenised configs have the same rows and words.
WIKITEXT_SIZES = {
    "wikitext-103": {"train": (1_801_350, 103_227_021), "validation": (3_760, 217_646), "test": (4_358, 245_569)},
    "wikitext-2": {"train": (36_718, 2_088_628), "validation": (3_760, 217_646), "test": (4_358, 245_569)},
}
# Measured here with GPT-2's genuine tokenizer and `data.chunk_texts` on the shared WikiText slices
# (wikitext-2-raw test, 2,891 non-empty rows; wikitext-103 validation gives the same within 2%):
# GPT-2 BPE tokens per word, tokens per non-empty row, and (units per row, tokens per unit) by block size.
WIKITEXT_STATS = {
    "tokens_per_word": 1.16,
    "tokens_per_row": 97.0,
    "gendered_share": 0.33,  # units with a gendered word (what CDA can change)
    "units": {64: (2.46, 39.1), 128: (1.44, 67.0), 256: (1.06, 90.5), 512: (1.0, 96.1), 1024: (1.0, 96.1)},
}
GPT2_CHARS_PER_TOKEN = 4.57  # measured on wikitext-2-raw test with GPT-2 BPE

# (n_layer, n_embd, vocab) of the hub models.
HUB_SHAPES = {"distilgpt2": (6, 768, 50257), "gpt2": (12, 768, 50257), "gpt2-medium": (24, 1024, 50257),
              "gpt2-large": (36, 1280, 50257), "gpt2-xl": (48, 1600, 50257)}
# Dense peak TFLOP/s (bf16 tensor cores, fp32 without TF32) from the vendors' data sheets (SXM parts).
GPU_PEAK_TFLOPS = {"V100": (125.0, 15.7), "T4": (65.0, 8.1), "A10": (125.0, 31.2), "L4": (121.0, 30.3),
                   "L40S": (362.0, 91.6), "A100": (312.0, 19.5), "H100": (989.0, 67.0), "H200": (989.0, 67.0)}
DEFAULT_GPUS = ("A100", "H100")
MODES = ("nondp", "dp", "dp-fast")


# --------------------------------------------------------------------------- model shapes
def model_shape(profile: Profile) -> tuple[str, int, int, int]:
    """(name, n_layer, n_embd, vocab) of the profile's base model."""
    base = profile.model.base
    short = base.split("/")[-1]  # canonical ids: openai-community/gpt2, distilbert/distilgpt2
    if not looks_like_path(base) and short in HUB_SHAPES:
        return (short, *HUB_SHAPES[short])
    if base == BUILTIN:
        b = profile.model.builtin
        return ("builtin", b.n_layer, b.n_embd, b.vocab_size)
    from .basemodel import model_structure

    found = model_structure(str(resolve_path(base)) if looks_like_path(base) else base)
    if found is None:
        raise ValueError(f"cost: the config of {base!r} is not available offline (run `dpbias prefetch` first)")
    cfg = found[0].to_dict()
    name = Path(base).name
    layers = cfg.get("n_layer", cfg.get("num_hidden_layers", 12))
    width = cfg.get("n_embd", cfg.get("hidden_size", 768))
    return (name, int(layers), int(width), int(cfg.get("vocab_size", 50257)))


def flops_per_token(n_layer: int, n_embd: int, vocab: int, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward, forward = 2 x (12 L d^2 + V d) + 2 L T d (Kaplan et al. 2020)."""
    return 3.0 * (2.0 * (12 * n_layer * n_embd**2 + vocab * n_embd) + 2.0 * n_layer * seq_len * n_embd)


def model_key(name: str) -> str:
    return name


def gpu_key(device: str) -> str:
    """'NVIDIA H200' -> 'H200', 'NVIDIA A100-SXM4-80GB' -> 'A100', 'cpu' -> 'cpu'."""
    d = device.strip()
    if d.lower() == "cpu":
        return "cpu"
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(^|[^A-Za-z0-9]){key}", d.upper().replace("A10G", "A10")):
            return key
    return d


# --------------------------------------------------------------------------- throughput table
@dataclass
class Throughput:
    model: str
    mode: str
    device: str
    block_size: int
    tokens_per_s: float
    source: str
    physical_batch: Optional[int] = None
    peak_mem_gb: Optional[float] = None

    @property
    def measured(self) -> bool:
        return self.source.lower().startswith("measured")


def load_throughput(path: Path | str = THROUGHPUT_CSV) -> list[Throughput]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(line for line in fh if line.strip() and not line.startswith("#")):
            try:
                rows.append(Throughput(
                    model=r["model"].strip(), mode=r["mode"].strip(), device=gpu_key(r["device"]),
                    block_size=int(r["block_size"]), tokens_per_s=float(r["tokens_per_s"]), source=r["source"].strip(),
                    physical_batch=int(r["physical_batch"]) if r.get("physical_batch") else None,
                    peak_mem_gb=float(r["peak_mem_gb"]) if r.get("peak_mem_gb") else None))
            except (KeyError, ValueError, TypeError, AttributeError):
                continue  # a malformed line is ignored rather than breaking a dry run
    return rows


def _shape_of(name: str, profile_shape: tuple) -> Optional[tuple[int, int, int]]:
    if name == profile_shape[0]:
        return profile_shape[1:]
    return HUB_SHAPES.get(name.replace("-shape", ""))


def lookup_throughput(rows: list[Throughput], shape: tuple[str, int, int, int], mode: str, device: str,
                      seq_len: int) -> tuple[Optional[float], str]:
    """(tokens/s, how it was obtained) for the model `shape` in `mode` on `device`."""
    name, L, d, V = shape
    dev = gpu_key(device)
    target_flops = flops_per_token(L, d, V, seq_len)
    cands = [r for r in rows if r.mode == mode and _shape_of(r.model, shape) is not None]

    def pref(r: Throughput):  # measured before assumptions, then the closest block size
        return (not r.measured, abs(r.block_size - seq_len))

    exact = sorted([r for r in cands if r.model == name and r.device == dev], key=pref)
    if exact:
        r = exact[0]
        kind = "measured" if r.measured else "ASSUMPTION"
        return r.tokens_per_s, f"{kind}: {r.model} {r.mode} on {r.device} ({r.source})"
    same_dev = sorted([r for r in cands if r.device == dev], key=pref)
    if same_dev:
        r = same_dev[0]
        f = flops_per_token(*_shape_of(r.model, shape), r.block_size) / target_flops
        kind = "estimate" if r.measured else "ASSUMPTION-based estimate"
        return r.tokens_per_s * f, (f"{kind}: scaled from {r.model} on {r.device} ({r.tokens_per_s:.0f} tok/s, "
                                    f"{r.source}) by training FLOPs/token x{f:.3g}")
    if dev in GPU_PEAK_TFLOPS:
        prec = 1  # fp32: every way of training runs in float32 (training.steppers)
        gpu_rows = sorted([r for r in cands if r.device in GPU_PEAK_TFLOPS],
                          key=lambda r: (r.model != name, not r.measured, abs(r.block_size - seq_len)))
        if gpu_rows:
            r = gpu_rows[0]
            fd = GPU_PEAK_TFLOPS[dev][prec] / GPU_PEAK_TFLOPS[r.device][prec]
            fm = flops_per_token(*_shape_of(r.model, shape), r.block_size) / target_flops
            kind = "estimate" if r.measured else "ASSUMPTION-based estimate"
            how = f"peak {'bf16' if prec == 0 else 'fp32'} FLOP/s {dev}/{r.device} x{fd:.3g}"
            if r.model != name:
                how += f" and training FLOPs/token x{fm:.3g}"
            return r.tokens_per_s * fd * fm, (f"{kind}: scaled from {r.model} on {r.device} ({r.tokens_per_s:.0f} tok/s,"
                                              f" {r.source}) by {how}")
    return None, f"no throughput for mode {mode} on {dev} in {THROUGHPUT_CSV.name}"


# --------------------------------------------------------------------------- corpus size
@dataclass
class CorpusSize:
    n_units: int                 # privacy units after chunking and the max_train_units cap
    tokens: float                # real tokens of those units (original rows)
    padded_len: float            # expected padded row length of a physical batch
    gendered_share: float        # share of units CDA can change (for augment mode)
    how: str
    notes: list[str] = field(default_factory=list)


def _quantile(values, q: float) -> float:
    import numpy as np

    return float(np.quantile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


def _tokenizer_for(profile: Profile):
    """The base model's tokenizer when it is available offline (local folder or hub cache), else None."""
    base = profile.model.base
    if base == BUILTIN:
        return None
    try:
        from transformers import AutoTokenizer

        name = str(resolve_path(base)) if looks_like_path(base) else base
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - offline without a cache: fall back to a ratio
        return None


def _sample_stats(texts: list[str], profile: Profile, controlled: bool) -> tuple[list[int], float, float, str]:
    """(unit lengths, units per text, gendered share, how) from a sample of texts."""
    from .data import units

    block = profile.data.block_size
    tok = _tokenizer_for(profile)
    if controlled:
        chunks = texts
    elif tok is not None:
        chunks = units.chunk_texts(texts, tok, block)
    else:
        chunks = None
    if tok is not None:
        lengths = [len(ids) for ids in tok(list(chunks))["input_ids"]]
        how = "tokenised with the model's tokenizer"
    elif controlled:
        per_word = 1.0 if profile.model.base == BUILTIN else 1.04  # built-in BPE is trained on this corpus
        lengths = [max(1, round(len(t.split()) * per_word)) + 1 for t in chunks]
        how = "words x tokens/word (no tokenizer offline)"
    else:  # characters / GPT-2's chars per token, chunked at block size
        lengths, chunks = [], []
        for t in texts:
            n = max(1, round(len(t) / GPT2_CHARS_PER_TOKEN))
            k = max(1, math.ceil(n / (0.85 * block)))
            lengths += [min(block, math.ceil(n / k))] * k
            chunks += [t] * k
        how = f"characters / {GPT2_CHARS_PER_TOKEN} (GPT-2 BPE ratio; no tokenizer offline)"
    from .data.cda import gender_of

    gendered = sum(gender_of(c) != "none" for c in chunks) / max(1, len(chunks))
    return lengths, len(lengths) / max(1, len(texts)), gendered, how


def corpus_size(profile: Profile, max_sample: int = 3000) -> CorpusSize:
    """Units and tokens of one training run's data (before CDA augment rows)."""
    d = profile.data
    block, B = d.block_size, profile.train.physical_batch_size
    q = 1 - 1 / (B + 1)  # expected maximum of B draws ~ this quantile
    notes = []
    if d.corpus == "controlled":
        from .data import corpus

        n = d.controlled.n_train_sentences
        sample = corpus.generate_controlled(min(n, 500), d.controlled.seed)["text"].tolist()
        lengths, _, gendered, how = _sample_stats(sample, profile, controlled=True)
        mean = sum(lengths) / len(lengths)
        units = min(n, d.max_train_units or n)
        return CorpusSize(units, units * mean, min(block, _quantile(lengths, q)), gendered,
                          f"controlled corpus: {n} sentences x {mean:.1f} tokens ({how}, 500-sentence sample)", notes)
    t = d.text
    src = t.source
    if not looks_like_path(src) and not Path(src).exists():
        family = re.match(r"(wikitext-103|wikitext-2)", t.config or "")
        if src.split("/")[-1] != "wikitext" or not family:
            raise ValueError(f"cost: no size known for hub dataset {src!r} (config {t.config!r}); "
                             "known: wikitext / wikitext-103-*, wikitext-2-*")
        rows_all, words = WIKITEXT_SIZES[family.group(1)][t.train_split if t.train_split in ("train", "validation", "test") else "train"]
        s = WIKITEXT_STATS
        tokens_all = words * s["tokens_per_word"]
        nonempty = tokens_all / s["tokens_per_row"]
        rows = min(nonempty, t.max_train_rows) if t.max_train_rows else nonempty
        near = min(s["units"], key=lambda b: abs(math.log(b / block)))
        upr, tpu = s["units"][near]
        if near != block:
            notes.append(f"units per row taken at block {near} (nearest measured to {block})")
        units = rows * upr
        tokens = rows * s["tokens_per_row"] * (0.99)  # chunk boundaries drop ~1% (measured)
        how = (f"hub {src} {t.config} {t.train_split}: {rows_all:,} rows ({nonempty:,.0f} non-empty), {words:,} words x "
               f"{s['tokens_per_word']} GPT-2 BPE tokens/word (measured) = {tokens_all / 1e6:.1f}M tokens")
        if t.max_train_rows:
            how += f"; max_train_rows {t.max_train_rows:,}"
        how += f"; {upr} units/row at block {near} (measured)"
        padded = float(block)
        gendered = s["gendered_share"]
    else:
        from .data.corpus import load_text_corpus

        source = str(resolve_path(src)) if looks_like_path(src) else src
        texts = load_text_corpus(source, split=t.train_split, config=t.config, max_rows=t.max_train_rows,
                                 text_column=t.text_column, split_fractions=t.split_fractions, rest_split=t.train_split)
        import random

        sample = texts if len(texts) <= max_sample else random.Random(0).sample(texts, max_sample)
        lengths, upr, gendered, how_tok = _sample_stats(sample, profile, controlled=False)
        units = len(texts) * upr
        tokens = units * (sum(lengths) / max(1, len(lengths)))
        padded = min(block, _quantile(lengths, q))
        how = (f"local {src}: {len(texts):,} rows counted, {upr:.2f} units/row and {tokens / max(units, 1):.1f} "
               f"tokens/unit ({how_tok}{', sample of %d rows' % len(sample) if len(sample) < len(texts) else ''})")
    if d.max_train_units and units > d.max_train_units:
        tokens *= d.max_train_units / units
        units = d.max_train_units
        how += f"; capped at max_train_units {d.max_train_units:,}"
    return CorpusSize(int(round(units)), tokens, padded, gendered, how, notes)


# --------------------------------------------------------------------------- the estimate
def mode_of(point: dict, profile: Profile) -> str:
    if point["epsilon"] is None:
        return "nondp"
    return "dp-fast" if profile.train.clipping == "fast" else "dp"


def estimate(profile: Profile, gpus: Optional[list[str]] = None, throughput_csv: Path | str = THROUGHPUT_CSV) -> dict:
    """Per-run rows and per-GPU totals (see the module docstring); `describe_cost` formats them."""
    from .pipeline.graph import plan

    size = corpus_size(profile)
    shape = model_shape(profile)
    table = load_throughput(throughput_csv)
    t = profile.train
    runs = []
    for n in plan(profile):
        if n.stage != "02":
            continue
        p = n.point
        extra = p["mixing_ratio"] * size.gendered_share if p["cda_mode"] == "augment" else 0.0
        rows_per_unit = 1.0 + extra
        run = t.for_run(p["epsilon"] is not None, method_of(p))  # DP-batched runs follow `train.dp`
        steps = max(1, int(round(run["epochs"] * size.n_units / run["logical_batch_size"])))
        tokens = run["epochs"] * size.tokens * rows_per_unit
        compute = run["epochs"] * size.n_units * rows_per_unit * size.padded_len
        runs.append({"node": n.node_id, "mode": mode_of(p, profile), "epsilon": p["epsilon"], "n_units": size.n_units,
                     "steps": steps, "tokens": tokens, "compute_tokens": compute})
    measured_gpus = sorted({r.device for r in table if r.device in GPU_PEAK_TFLOPS})
    devices = list(gpus) if gpus else list(dict.fromkeys(measured_gpus + list(DEFAULT_GPUS)))
    per_device = {}
    for dev in devices:
        total, hows, missing = 0.0, {}, False
        for mode in sorted({r["mode"] for r in runs}):
            tps, how = lookup_throughput(table, shape, mode, dev, int(round(size.padded_len)))
            hows[mode] = (tps, how)
            if tps is None:
                missing = True
                continue
            total += sum(r["compute_tokens"] for r in runs if r["mode"] == mode) / tps / 3600
        per_device[gpu_key(dev)] = {"gpu_hours": None if missing else total, "throughput": hows}
    return {"size": size, "shape": shape, "runs": runs, "devices": per_device}


def _fmt_tokens(x: float) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def describe_cost(profile: Profile, gpus: Optional[list[str]] = None, throughput_csv: Path | str = THROUGHPUT_CSV) -> str:
    """Text for `dpbias run --dry-run`: tokens, steps per run and GPU hours of the training runs."""
    try:
        est = estimate(profile, gpus, throughput_csv)
    except Exception as err:  # noqa: BLE001 - a dry run never fails because of the estimate
        return f"cost estimate unavailable: {type(err).__name__}: {err}"
    size, runs = est["size"], est["runs"]
    name, L, d, V = est["shape"]
    t = profile.train
    lines = [f"cost of {len(runs)} training runs (stage 02) of profile {profile.name}:",
             f"  model {name} ({L} layers, width {d}, vocab {V}; {flops_per_token(L, d, V, int(size.padded_len)) / 1e9:.2f} "
             f"GFLOP/token to train)",
             f"  data: {size.n_units:,} privacy units, {_fmt_tokens(size.tokens)} tokens per epoch",
             f"    from {size.how}"]
    lines += [f"    note: {n}" for n in size.notes]
    lines.append(f"  per run: epochs {t.epochs:g} x {size.n_units:,} units / logical batch {t.logical_batch_size} "
                 f"= steps; padded row length ~{size.padded_len:.0f} (block {profile.data.block_size})")
    dp_rule = {k: v for k, v in t.dp.model_dump().items() if v is not None}
    if dp_rule:
        lines.append("  DP runs (train.dp rule): " + ", ".join(f"{k} {v:g}" for k, v in dp_rule.items()))
    by_mode: dict[tuple, list] = {}
    for r in runs:
        by_mode.setdefault((r["mode"], r["steps"], round(r["tokens"]), round(r["compute_tokens"])), []).append(r)
    for (mode, steps, tokens, compute), group in by_mode.items():
        lines.append(f"    {len(group):>3} x {mode:<7}: {steps:,} steps/run, {_fmt_tokens(tokens)} tokens/run "
                     f"({_fmt_tokens(compute)} incl. padding)")
    total_tokens = sum(r["tokens"] for r in runs)
    lines.append(f"  total: {_fmt_tokens(total_tokens)} training tokens, {sum(r['steps'] for r in runs):,} optimizer steps")
    lines.append("  GPU hours of stage 02 (throughput from benchmarks/throughput.csv):")
    for dev, info in est["devices"].items():
        gh = info["gpu_hours"]
        per_run = {m: (sum(r["compute_tokens"] for r in runs if r["mode"] == m) / tps / 3600 /
                       max(1, sum(r["mode"] == m for r in runs))) for m, (tps, _) in info["throughput"].items() if tps}
        run_txt = ", ".join(f"{m} {h:.2f} h/run" for m, h in per_run.items())
        lines.append(f"    {dev:<5}: {'n/a' if gh is None else f'{gh:,.1f} GPU-h'}" + (f" ({run_txt})" if run_txt else ""))
        for mode, (tps, how) in info["throughput"].items():
            lines.append(f"           {mode}: {'?' if tps is None else f'{tps:,.0f} tokens/s'} - {how}")
    res = profile.execution.resources
    if res:
        lines.append("  Slurm resources per node: " + "; ".join(
            f"{s}: {r.gpus} GPU, {r.cpus} CPU, {r.mem_gb} GB, {r.time_min} min" for s, r in sorted(res.items())))
        r02 = res.get("02")
        if r02 is not None:
            for dev, info in est["devices"].items():
                per = [tps for tps, _ in info["throughput"].values() if tps]
                if per and runs:
                    worst = max(r["compute_tokens"] for r in runs) / min(per) / 60
                    if worst > r02.time_min:
                        lines.append(f"  WARNING: on {dev} the longest run needs ~{worst:,.0f} min > stage 02 time_min "
                                     f"{r02.time_min} (it resumes from checkpoints when re-submitted)")
    lines += _stage_costs(profile, est, throughput_csv)
    return "\n".join(lines)


def _stage_costs(profile: Profile, est: dict, throughput_csv: Path | str = THROUGHPUT_CSV) -> list[str]:
    """Disk of stage 02's outputs, and stage 03 / 04 GPU time where `dpbias preflight` measured them
    (throughput.csv modes ``gradnorms`` / ``generate``)."""
    name, L, d, V = est["shape"]
    n_params = 12 * L * d * d + V * d  # Kaplan et al. 2020's count plus the (tied) embedding
    model_gb = n_params * 4 / 1e9
    snapshots = len(profile.train.progress_points) + 1  # progress/pct_* and the final model
    per_run = model_gb * (snapshots + 3)  # + one checkpoint: weights and Adam's two moments
    runs = est["runs"]
    lines = [f"  disk of stage 02: ~{per_run:.2f} GB per run ({snapshots} model copies of {model_gb:.2f} GB + a "
             f"checkpoint with Adam state), ~{per_run * len(runs):,.1f} GB for {len(runs)} runs"]
    table = load_throughput(throughput_csv)
    g = profile.gradnorms
    n_splits = 2  # female and male at least (more with CDA pairs / non-binary subjects)
    for dev in est["devices"]:
        meas = {r.mode: r for r in table if r.model == name and r.device == dev and r.mode in ("gradnorms", "generate")}
        if "gradnorms" in meas:
            tok = len(profile.train.progress_points) * n_splits * g.max_units_per_split * profile.data.block_size
            lines.append(f"  stage 03 on {dev}: ~{tok / meas['gradnorms'].tokens_per_s / 60:.1f} min per run "
                         f"(>= {n_splits} splits x {g.max_units_per_split} units x {len(profile.train.progress_points)} "
                         f"snapshots; measured by preflight)")
        if "generate" in meas:
            ev = profile.evaluation
            prompts = ev.max_prompts_per_group * 2 if ev.max_prompts_per_group else 3204  # BOLD gender: 3,204
            tok = prompts * ev.k * ev.max_new_tokens
            lines.append(f"  stage 04 generation on {dev}: ~{tok / meas['generate'].tokens_per_s / 60:.1f} min per model "
                         f"({prompts:,} prompts x k {ev.k} x {ev.max_new_tokens} tokens; measured by preflight; scoring "
                         "and stereotype items not included)")
    if not any("stage 03" in line for line in lines):
        lines.append("  stages 03 / 04: run `dpbias preflight` on the GPU machine to measure them (see time_min)")
    return lines
