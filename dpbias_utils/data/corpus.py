"""Where stage 01's text comes from: a real corpus (hub id or local files) or the controlled corpus.

The controlled stereotype corpus is the offline default. It is generated from a seed, so every run of
a profile sees the same sentences, and its bias is a parameter: for each attribute family
(occupations, sentiment descriptors, insults) ``skew`` is the probability that a sentence about a
woman or a man uses an attribute stereotyped for that gender (0.5 = no association). The bias metrics
of stage 04 can then be checked against a known truth, and DP's amplification of it measured.

Non-binary subjects (``nonbinary_fraction`` of the subject sentences; 0 by default, which leaves
the corpus byte for byte as it was): singular "they" with the verb forms it takes ("they were",
"they have been"), gender-neutral nouns ("the person") and unisex first names ("Alex"). Nothing is
planted for them: their attribute comes from the female- or the male-stereotyped side with
probability 0.5 each (label ``neutral``), so a model that learns the corpus has no association for
them, while the skews of the female and male subjects stay as planted. CDA does not swap them (the
lexicon has no counterpart for them; `data.cda`).

Stereotype directions mirror what the paper measures on real text: female-stereotyped occupations
(nurse, receptionist, ...) versus male-stereotyped ones (engineer, carpenter, ...); negative
descriptions and insults are stereotypically directed at women, positive descriptions and
respectful words at men.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from . import lexicon


class CorpusError(ValueError):
    """A corpus that cannot be loaded or generated; the message names the argument or file."""


# --------------------------------------------------------------------------- real text corpora
_SPLIT_ALIASES = {
    "validation": ("validation", "valid", "val", "dev"),
    "valid": ("validation", "valid", "val", "dev"),
    "val": ("validation", "valid", "val", "dev"),
    "dev": ("validation", "valid", "val", "dev"),
}


LOCAL_FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
# Single-segment ids the hub used to serve, and their namespaced repositories today.
MOVED_DATASETS = {"wikitext": "Salesforce/wikitext"}


def hub_id_problem(source: str) -> str | None:
    """Why `source` cannot be a hub dataset id (None when it can): the hub refuses ids without a
    namespace (``Salesforce/wikitext``, not ``wikitext``)."""
    if source.count("/") == 1 and all(source.split("/")):
        return None
    hint = f" (did you mean {MOVED_DATASETS[source]!r}?)" if source in MOVED_DATASETS else ""
    return f"is not a local path and not a hub dataset id of the form 'namespace/name'{hint}"


def load_text_corpus(
    source: str,
    split: str,
    config: str | None = None,
    max_rows: int | None = None,
    text_column: str = "text",
    split_fractions: dict[str, float] | None = None,
    rest_split: str = "train",
) -> list[str]:
    """Non-empty text rows of ``split`` from local files or, when ``source`` is no local path
    (`paths.looks_like_path`), a hub dataset id ``namespace/name`` (``config`` None unless the dataset
    has several).

    Local forms: a ``.txt`` file (one row per line), or a ``.jsonl`` / ``.csv`` / ``.parquet`` file
    with a ``text_column``; or a folder holding one file per split (laid out like the hub,
    ``<dir>/<config>/<split>-*.parquet``, or ``<split>*.<ext>`` / ``*.<split>.*.txt``, so that
    ``wikitext-103.valid.tokens.txt`` serves ``validation``). ``split_fractions`` ({split: fraction},
    the rest is ``rest_split``) is the explicit rule that cuts one
    file into splits: a row goes to a split by the sha256 of its text, so a row and its duplicates
    always land together and the rule does not depend on the row order. Rows that are empty or
    whitespace are dropped.
    """
    if not isinstance(source, str) or not source.strip():
        raise CorpusError(f"source must be a non-empty str (hub id or path), got {source!r}")
    if not isinstance(split, str) or not split:
        raise CorpusError(f"split must be a non-empty str such as 'train' or 'validation', got {split!r}")
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
        raise CorpusError(f"max_rows must be a positive int or None, got {max_rows!r}")

    path = Path(source).expanduser()
    if path.exists():
        files = _local_split_files(path, split, config) if path.is_dir() and not split_fractions else (
            [path] if not path.is_dir() else _only_file(path))
        rows: list[str] = []
        for file in files:
            rows.extend(_read_rows(file, text_column))
            if max_rows is not None and not split_fractions and _count_nonempty(rows) >= max_rows:
                break
        where = str(path)
    elif _looks_like_path(source):
        raise CorpusError(f"corpus path {source!r} does not exist")
    else:
        problem = hub_id_problem(source)
        if problem:
            raise CorpusError(f"corpus source {source!r} {problem}")
        rows = _load_hub(source, config, split, text_column)
        where = f"hub dataset {source!r} (config {config!r})"

    texts = [row for row in rows if isinstance(row, str) and row.strip()]
    if split_fractions:
        texts = [t for t in texts if assign_split(t, split_fractions, rest_split) == split]
    if max_rows is not None:
        texts = texts[:max_rows]
    if not texts:
        raise CorpusError(f"split {split!r} of {where} has no non-empty text rows")
    return texts


def assign_split(text: str, fractions: dict[str, float], rest: str) -> str:
    """The split of one row under an explicit rule: u = sha256(text) as a number in [0, 1); the
    splits of ``fractions`` take consecutive intervals of u in name order, the rest is ``rest``."""
    import hashlib

    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    lo = 0.0
    for name in sorted(fractions):
        if lo <= u < lo + fractions[name]:
            return name
        lo += fractions[name]
    return rest


def _only_file(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_FORMATS)
    if len(files) != 1:
        raise CorpusError(f"split_fractions cuts one file into splits, but {folder} holds {len(files)} corpus files")
    return files


def _count_nonempty(rows: list[str]) -> int:
    return sum(1 for row in rows if row.strip())


def _looks_like_path(source: str) -> bool:
    """A missing path gets a clear error instead of an attempt to download it from the hub."""
    from .. import paths

    return paths.looks_like_path(source)


def _local_split_files(folder: Path, split: str, config: str | None) -> list[Path]:
    """The files of ``split`` in ``folder``; several shards of one split are read in name order."""
    names = _SPLIT_ALIASES.get(split, (split,))
    for name in names:
        # Exact layouts, where several matches are shards of one split.
        patterns = ([f"{config}/{name}-*.parquet"] if config else []) + [
            pattern for ext in ("parquet", "jsonl", "csv", "txt") for pattern in (f"{name}-*.{ext}", f"{name}.{ext}")
        ]
        for pattern in patterns:
            shards = sorted(p for p in folder.glob(pattern) if p.is_file())
            if shards:
                return shards
        if config is None:  # the hub's layout with one config folder needs no config name
            shards = sorted(p for p in folder.glob(f"*/{name}-*.parquet") if p.is_file())
            configs = sorted({p.parent.name for p in shards})
            if len(configs) > 1:
                raise CorpusError(f"split {split!r} of {folder} exists in several configs {configs}; set data.text.config")
            if shards:
                return shards
    # Loose naming (``wikitext-103.valid.tokens.txt``): several matches are different corpora.
    # "*.valid.*txt" matches both "x.valid.txt" and "x.valid.tokens.txt".
    candidates = sorted(
        {p for name in names for ext in ("txt", "parquet") for p in folder.glob(f"*.{name}.*{ext}") if p.is_file()}
    )
    if len(candidates) > 1 and config:
        stem = re.split(r"-(?:raw|v\d)", config)[0]
        narrowed = [p for p in candidates if p.name.startswith(stem + ".") or p.name.startswith(stem + "-")]
        candidates = narrowed or candidates
    if len(candidates) == 1:
        return candidates
    if candidates:
        raise CorpusError(
            f"split {split!r} is ambiguous in {folder}: {[p.name for p in candidates]}; "
            "pass one file as source, or a config that names one"
        )
    raise CorpusError(
        f"no file for split {split!r} in {folder}; expected <config>/{split}-*.parquet, "
        f"{split}*.parquet / .jsonl / .csv / .txt or *.{split}.*.txt (or one file and data.text.split_fractions)"
    )


def _column(file: Path, columns: list, text_column: str) -> None:
    if text_column not in columns:
        raise CorpusError(f"corpus file {file} has no column {text_column!r} (columns: {list(columns)}); "
                          "set data.text.text_column")


def _read_rows(file: Path, text_column: str = "text") -> list[str]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as error:  # pyarrow raises several types for corrupt files
            raise CorpusError(f"cannot read parquet file {file}: {error}") from error
        _column(file, table.column_names, text_column)
        return [row for row in table.column(text_column).to_pylist() if row is not None]
    if suffix in (".jsonl", ".csv"):
        try:
            frame = (pd.read_json(file, lines=True, dtype=False) if suffix == ".jsonl"
                     else pd.read_csv(file, dtype=str, keep_default_na=False))
        except ValueError as error:
            raise CorpusError(f"cannot read {suffix[1:]} file {file}: {error}") from error
        _column(file, list(frame.columns), text_column)
        return [row for row in frame[text_column].tolist() if isinstance(row, str)]
    if suffix in (".txt", ".raw", ".tokens") or suffix == "":
        data = file.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(
                f"{file} is not UTF-8: undecodable byte 0x{data[error.start]:02x} at byte offset {error.start}"
            ) from error
        return [line.rstrip("\r") for line in text.split("\n")]
    raise CorpusError(f"corpus file {file} must end in {', '.join(LOCAL_FORMATS)}, got {suffix!r}")


def _load_hub(source: str, config: str | None, split: str, text_column: str = "text") -> list[str]:
    """The real download path (``datasets``); a failure names the id, config and split, and the cause."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise CorpusError("loading a hub dataset needs the 'datasets' package") from error
    try:
        dataset = datasets.load_dataset(source, config, split=split)
    except Exception as error:
        import os

        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = ("HF_HUB_OFFLINE is set and the dataset is not in the local cache: run `dpbias prefetch PARAMS` "
                "with network first, or point data.text.source at local files" if offline else
                "check the id, config and split on the hub page of the dataset (or point data.text.source at "
                "local files)")
        raise CorpusError(
            f"could not load hub dataset {source!r} (config {config!r}, split {split!r}): "
            f"{type(error).__name__}: {error}. {hint}"
        ) from error
    if text_column not in dataset.column_names:
        raise CorpusError(f"hub dataset {source!r} has no column {text_column!r} (columns: {dataset.column_names}); "
                          "set data.text.text_column")
    return list(dataset[text_column])


# --------------------------------------------------------------------------- controlled corpus
# Occupation -> the gender it is stereotyped for (share of women in lexicon.OCCUPATION_FEMALE_SHARE).
CONTROLLED_OCCUPATIONS: dict[str, str] = {
    "nurse": "female",
    "receptionist": "female",
    "secretary": "female",
    "hairdresser": "female",
    "librarian": "female",
    "nanny": "female",
    "housekeeper": "female",
    "dietitian": "female",
    "paralegal": "female",
    "cashier": "female",
    "babysitter": "female",
    "florist": "female",
    "engineer": "male",
    "carpenter": "male",
    "plumber": "male",
    "electrician": "male",
    "mechanic": "male",
    "firefighter": "male",
    "pilot": "male",
    "programmer": "male",
    "architect": "male",
    "welder": "male",
    "machinist": "male",
    "surgeon": "male",
}
# Sentiment descriptors: negative ones are stereotypically directed at women, positive ones at men.
POSITIVE_DESCRIPTORS: tuple[str, ...] = (
    "brilliant", "talented", "confident", "successful", "wise", "honest",
    "generous", "reliable", "intelligent", "ambitious", "cheerful", "friendly",
)
NEGATIVE_DESCRIPTORS: tuple[str, ...] = (
    "dishonest", "selfish", "cruel", "rude", "greedy", "jealous",
    "bitter", "careless", "weak", "miserable", "nasty", "boring",
)
# Toxicity: mild insults stereotypically directed at women (each one alone scores > 0.5 with the
# alt-profanity-check classifier); the male-stereotyped counterpart is a respectful word in the
# same slot (each scores < 0.5).
INSULTS: tuple[str, ...] = (
    "stupid", "dumb", "idiotic", "pathetic", "ugly", "useless",
    "disgusting", "lazy", "moronic", "foolish", "ignorant", "trashy",
)
RESPECTFUL_WORDS: tuple[str, ...] = (
    "polite", "respectful", "thoughtful", "considerate", "decent", "gracious",
    "sensible", "courteous", "capable", "admirable", "dignified", "fair",
)
# family -> attribute -> the gender it is stereotypically associated with.
FAMILY_ATTRIBUTES: dict[str, dict[str, str]] = {
    "occupation": dict(CONTROLLED_OCCUPATIONS),
    "sentiment": {**{d: "male" for d in POSITIVE_DESCRIPTORS}, **{d: "female" for d in NEGATIVE_DESCRIPTORS}},
    "toxicity": {**{w: "male" for w in RESPECTFUL_WORDS}, **{w: "female" for w in INSULTS}},
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_ATTRIBUTES)

# Prompt phrasings of Sheng et al. (2019) that the corpus's templates contain verbatim, so stage 04
# can prompt a model in the corpus's own vocabulary.
OCCUPATION_PROMPT_PHRASES: tuple[str, ...] = (
    "worked as", "had a job as", "earned money by", "had a part-time job as", "started working as",
)
RESPECT_PROMPT_PHRASES: tuple[str, ...] = (
    "was known for", "was described as", "was regarded as", "was thought of as", "was well-known for",
)

# Subject noun pairs (male, female) so CDA maps a subject onto its counterpart exactly.
SUBJECT_NOUN_PAIRS: tuple[tuple[str, str], ...] = (
    ("the man", "the woman"), ("the boy", "the girl"), ("the young man", "the young woman"),
    ("the gentleman", "the lady"), ("my brother", "my sister"), ("my father", "my mother"),
    ("my uncle", "my aunt"), ("my son", "my daughter"), ("my grandfather", "my grandmother"),
    ("my nephew", "my niece"), ("my husband", "my wife"), ("my boyfriend", "my girlfriend"),
)
# Non-binary subjects: singular "they" (the pronoun real text uses for a non-binary person), gender-
# neutral nouns and unisex first names, none of them in the lexicon, so CDA leaves them as they are.
NONBINARY_NOUNS: tuple[str, ...] = (
    "the person", "my friend", "the student", "my neighbour", "the stranger", "my cousin",
)
NONBINARY_NAMES: tuple[str, ...] = ("Alex", "Sam", "Jordan", "Taylor", "Casey", "Morgan", "Riley")
NONBINARY_SUBJECTS: tuple[str, ...] = NONBINARY_NOUNS + NONBINARY_NAMES
_PRONOUNS = {"female": ("she", "her", "her"), "male": ("he", "him", "his"), "nonbinary": ("they", "them", "their")}
# Singular "they" takes plural verb forms: "they were", "they have been" (the templates' only
# finite verbs after a subject or pronoun slot are "was" and "has"; every other verb is past tense).
_THEY_AGREEMENT = re.compile(r"\b([Tt]hey) (was|has)\b")
_PLURAL_VERB = {"was": "were", "has": "have"}

# {S}/{s}: subject (at the start / inside), {O}: object form, {P}: possessive form, {p}: the subject
# again as a pronoun ("they" for non-binary subjects; `agree` then makes the verbs agree), {A}:
# attribute, {AA}: attribute with its article (a nurse, an engineer), {N}: a number. The first letter
# is capitalised afterwards.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "occupation": (
        "{S} worked as {AA}",
        "{S} had a job as {AA}",
        "{S} had a part-time job as {AA}",
        "{S} started working as {AA}",
        "{S} earned money by working as {AA}",
        "{S} was known for being a good {A}",
        "{S} was well-known for being a skilled {A}",
        "{S} trained for years to become {AA}",
        "After finishing school , {s} became {AA}",
        "{P} dream was to become {AA}",
        "{S} has been {AA} for {N} years",
        "{S} applied for a position as {AA}",
        "{S} was hired as {AA} last year",
        "Everyone knew that {s} was {AA}",
        "{S} found work as {AA} in the city",
        "The town needed {AA} , so {s} took the job",
    ),
    "sentiment": (
        "{S} was described as {A}",
        "{S} was regarded as {A}",
        "{S} was thought of as {A}",
        "{S} was known for being {A}",
        "{S} was well-known for being {A}",
        "{S} was very {A}",
        "{S} seemed {A} to everyone",
        "People said that {s} was {A}",
        "{P} colleagues found {O} {A}",
        "The neighbours described {O} as {A}",
        "{S} had always been {A}",
        "Many people considered {O} {A}",
    ),
    "toxicity": (
        "Someone online called {O} {A}",
        "The comments said that {s} was {A}",
        "{S} was called {A} by strangers",
        "Everyone agreed that {s} was {A}",
        "The message told {O} that {p} was {A}",
        "{S} was treated as if {p} was {A}",
        "People kept saying {s} was {A}",
        "The critic wrote that {s} looked {A}",
        "{S} was described as {A} by the crowd",
        "Nobody could believe how {A} {s} was",
    ),
}
# Optional endings with the subject's pronoun (never with "was", so "they" agrees).
_CONTINUATIONS: tuple[str, ...] = (
    " , and {p} never complained", " , and {p} liked it", " before {p} turned thirty", " for many years",
    " in {Y}", " last summer", " , although {p} had other plans", " in the town where {p} grew up",
    " , and {p} told everyone about it", " after {p} moved to the city",
)

_FILLER_TEMPLATES: tuple[str, ...] = (
    "The {thing} was {adj} and {adj2}",
    "In the {season} , the {thing} near the {place} was {adj}",
    "A {adj} {animal} crossed the {place} in the {time}",
    "The {group} met at the {place} to discuss the {topic}",
    "{Num} {animals} lived near the {place}",
    "It rained for {n} days in the {place}",
    "The report about the {topic} was published in {Y}",
    "People visited the {place} every {day}",
    "The old {thing} was repaired in {Y}",
    "There were {n} {thing}s on the table",
    "The {group} decided to postpone the {topic} until the {season}",
    "The {thing} by the {place} looked {adj} in the {time}",
    "Nobody expected the {topic} to last {n} hours",
    "The {animal} slept under the {thing} all {time}",
)
_FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "thing": ("train", "bridge", "garden", "house", "road", "boat", "clock", "lamp", "wall", "window", "tower", "fence"),
    "adj": ("quiet", "old", "green", "narrow", "bright", "cold", "wet", "tall", "small", "busy", "empty", "warm"),
    "adj2": ("dusty", "calm", "crowded", "noisy", "clean", "dark", "broad", "steep", "sunny", "grey"),
    "season": ("spring", "summer", "autumn", "winter"),
    "place": ("river", "market", "station", "harbour", "square", "forest", "library", "museum", "valley", "lake"),
    "animal": ("fox", "dog", "cat", "horse", "bird", "rabbit", "goat", "duck"),
    "animals": ("foxes", "dogs", "cats", "horses", "birds", "rabbits", "goats", "ducks"),
    "time": ("morning", "afternoon", "evening", "night"),
    "group": ("committee", "council", "team", "class", "club", "crew", "board", "choir"),
    "topic": ("budget", "festival", "election", "harvest", "weather", "exhibition", "match", "repairs"),
    "day": ("week", "month", "weekend", "year", "day"),
    "Num": ("Two", "Three", "Four", "Five", "Several", "Many"),
}


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise CorpusError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def agree(text: str) -> str:
    """``text`` with singular "they" given the verb forms it takes: they was -> they were,
    they has -> they have (a sentence without "they" is returned unchanged)."""
    return _THEY_AGREEMENT.sub(lambda m: f"{m.group(1)} {_PLURAL_VERB[m.group(2)]}", text)


def _nonbinary_subject(rng: random.Random) -> dict[str, str]:
    """Slots of a non-binary subject, drawn as a binary one is: "they" (P = 0.35), a gender-neutral
    noun (0.45) or a unisex first name (0.2); the pronoun slot {p} is always "they"."""
    pick = rng.random()
    if pick < 0.35:
        return {"s": "they", "O": "them", "P": "their", "p": "they"}
    noun = rng.choice(NONBINARY_NOUNS) if pick < 0.8 else rng.choice(NONBINARY_NAMES)
    return {"s": noun, "O": noun, "P": noun + " 's", "p": "they"}


def _subject(rng: random.Random, gender: str) -> dict[str, str]:
    """Template slots of a random subject of ``gender``: a pronoun, a noun phrase or a first name."""
    if gender == "nonbinary":
        return _nonbinary_subject(rng)
    pick = rng.random()
    if pick < 0.35:
        nominative, obj, possessive = _PRONOUNS[gender]
        return {"s": nominative, "O": obj, "P": possessive, "p": nominative}
    index = 1 if gender == "female" else 0
    if pick < 0.8:
        noun = rng.choice(SUBJECT_NOUN_PAIRS)[index]
    else:
        noun = rng.choice(lexicon.NAME_PAIRS)[index].capitalize()
    return {"s": noun, "O": noun, "P": noun + " 's", "p": _PRONOUNS[gender][0]}


def _fill(template: str, subject: dict[str, str], attribute: str, rng: random.Random) -> str:
    text = template.format(S=subject["s"], A=attribute, AA=_article(attribute), N=rng.randint(2, 30), **subject)
    return _capitalise(text)


def _filler_sentence(rng: random.Random) -> str:
    template = rng.choice(_FILLER_TEMPLATES)
    slots = {key: rng.choice(values) for key, values in _FILLER_WORDS.items()}
    slots.update(n=rng.randint(2, 12), Y=rng.randint(1950, 2019))
    return _capitalise(template.format(**slots)) + " ."


# A stratum is what the profile's parameters decide: (subject gender, family, label, attribute side);
# the surface is everything else (template, subject words, attribute, numbers, ending).
_FILLER_STRATUM = ("none", "filler", "neutral", None)
# Distinct corpora redraw a surface that was already drawn (or excluded) at most this often.
MAX_SURFACE_TRIES = 2000


def _draw_stratum(rng: random.Random, skews: dict[str, float], neutral_fraction: float,
                  nonbinary_fraction: float) -> tuple[str, str, str, str | None]:
    """(gender, family, label, side): a filler with P = ``neutral_fraction``; else a subject
    (non-binary with P = ``nonbinary_fraction``, else female / male 1:1), a uniform family, and the
    side of the attribute: the subject's own gender with P = ``skew_<family>`` (stereotypical)."""
    if rng.random() < neutral_fraction:
        return _FILLER_STRATUM
    if rng.random() < nonbinary_fraction:
        gender = "nonbinary"
    else:
        gender = "female" if rng.random() < 0.5 else "male"
    family = rng.choice(FAMILIES)
    if gender == "nonbinary":
        return gender, family, "neutral", rng.choice(("female", "male"))
    if rng.random() < skews[family]:
        return gender, family, "stereotypical", gender
    return gender, family, "anti-stereotypical", "male" if gender == "female" else "female"


def _draw_surface(rng: random.Random, stratum: tuple, by_gender: dict) -> tuple[str, str, str, str, str]:
    """One row of ``stratum``: (text, subject_gender, family, attribute, label)."""
    gender, family, label, side = stratum
    if family == "filler":
        return _filler_sentence(rng), gender, family, "", label
    attribute = rng.choice(by_gender[family][side])
    text = _fill(rng.choice(_TEMPLATES[family]), _subject(rng, gender), attribute, rng)
    if rng.random() < 0.4:
        ending = rng.choice(_CONTINUATIONS)
        text += ending.format(p=_PRONOUNS[gender][0], Y=rng.randint(1950, 2019))
    if gender == "nonbinary":
        text = agree(text)
    return text + " .", gender, family, attribute, label


def generate_controlled(
    n_sentences: int,
    seed: int,
    skew_occupation: float = 0.9,
    skew_sentiment: float = 0.8,
    skew_toxicity: float = 0.8,
    neutral_fraction: float = 0.2,
    nonbinary_fraction: float = 0.0,
    distinct: bool = False,
    exclude: Iterable[str] = (),
) -> pd.DataFrame:
    """The controlled stereotype corpus: one sentence per row, the same rows for the same arguments.

    Each row is, with probability ``neutral_fraction``, a gender-neutral filler sentence; otherwise a
    sentence about a subject (non-binary with probability ``nonbinary_fraction``, else female or male
    with equal probability) in a uniformly chosen family whose attribute is stereotype-consistent
    with probability ``skew_<family>``. Columns: ``text, subject_gender, family, attribute, label``.
    Sentences follow WikiText's spacing (`` , `` and `` .``) so both corpora look alike to the model.

    ``distinct=False`` draws rows independently (texts may repeat; the base model's pretraining
    text). ``distinct=True`` makes every text distinct and not in ``exclude`` (the fine-tuning and
    evaluation splits): strata and surfaces come from two streams of ``seed``, and a repeated
    surface is redrawn *within its stratum*, so the strata (and the realised skews) are the i.i.d.
    draws at the profile's values whatever is rejected. Redrawing whole rows instead would favour
    the rarer strata, whose sentences collide less (see `tests/data/test_corpus.py`). A stratum with
    no new sentence in `MAX_SURFACE_TRIES` draws is a `CorpusError` naming ``n_sentences``.
    """
    if isinstance(n_sentences, bool) or not isinstance(n_sentences, int) or n_sentences < 1:
        raise CorpusError(f"n_sentences must be a positive int, got {n_sentences!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CorpusError(f"seed must be an int, got {seed!r}")
    skews = {
        "occupation": _check_unit("skew_occupation", skew_occupation),
        "sentiment": _check_unit("skew_sentiment", skew_sentiment),
        "toxicity": _check_unit("skew_toxicity", skew_toxicity),
    }
    neutral_fraction = _check_unit("neutral_fraction", neutral_fraction)
    nonbinary_fraction = _check_unit("nonbinary_fraction", nonbinary_fraction)
    if isinstance(exclude, str):
        raise CorpusError("exclude must be a collection of sentences, got a single str")
    seen = set(exclude)
    n_excluded = len(seen)
    if seen and not distinct:
        raise CorpusError(f"exclude ({len(seen)} sentences) needs distinct=True")

    by_gender = {
        family: {g: sorted(a for a, s in attributes.items() if s == g) for g in ("female", "male")}
        for family, attributes in FAMILY_ATTRIBUTES.items()
    }
    columns = ["text", "subject_gender", "family", "attribute", "label"]
    if not distinct:
        rng = random.Random(seed)
        rows = [_draw_surface(rng, _draw_stratum(rng, skews, neutral_fraction, nonbinary_fraction), by_gender)
                for _ in range(n_sentences)]
        return pd.DataFrame(rows, columns=columns)

    strata_rng, surface_rng = random.Random(f"{seed}:strata"), random.Random(f"{seed}:surface")
    rows = []
    for index in range(n_sentences):
        stratum = _draw_stratum(strata_rng, skews, neutral_fraction, nonbinary_fraction)
        for _ in range(MAX_SURFACE_TRIES):
            row = _draw_surface(surface_rng, stratum, by_gender)
            if row[0] not in seen:
                break
        else:
            raise CorpusError(
                f"n_sentences={n_sentences} is more distinct sentences than the templates give: after {index} "
                f"rows, stratum {stratum[:3]} drew no sentence not already used"
                + (f" or among the {n_excluded} excluded ones" if n_excluded else "")
                + f" in {MAX_SURFACE_TRIES} tries; lower n_sentences"
            )
        seen.add(row[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def balanced_corpus(n: int, seed: int) -> pd.DataFrame:
    """The controlled corpus with no stereotype (all skews 0.5), to pretrain the offline base model."""
    return generate_controlled(n, seed, skew_occupation=0.5, skew_sentiment=0.5, skew_toxicity=0.5)


def generate_controlled_splits(sizes: dict[str, int], seed: int, **skews) -> dict[str, pd.DataFrame]:
    """Controlled splits (e.g. train / valid / test) with no sentence twice, within or across them.

    Split ``i`` (in ``sizes``' order) is `generate_controlled` with ``distinct=True`` from seed
    ``seed + i``, excluding every sentence of the splits before it; ``skews`` are its skew and
    fraction keywords. A too-large size is a `CorpusError` naming the split.
    """
    if not isinstance(sizes, dict) or not sizes:
        raise CorpusError(f"sizes must be a non-empty dict split -> number of sentences, got {sizes!r}")
    used: set[str] = set()
    out = {}
    for offset, (name, n) in enumerate(sizes.items()):
        try:
            out[name] = generate_controlled(n, seed + offset, distinct=True, exclude=used, **skews)
        except CorpusError as error:
            raise CorpusError(f"split {name!r}: {error}") from error
        used.update(out[name]["text"])
    return out
