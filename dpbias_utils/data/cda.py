"""Counterfactual data augmentation: swap every gendered word for its counterpart, touch nothing else.

One compiled regex finds the lexicon's words as whole words (not inside ``history``, ``shell`` or
``Hershey``) in lower, Title or UPPER case; a dict lookup gives the counterpart, and the case of the
original (``he``, ``He``, ``HE``) is restored. Oddly cased forms (``hE``) are left alone by the swap
but still counted by `gendered_counts`, which ignores case. Everything else of the text, including
WikiText's tokenized forms (`` @-@ ``, `` @,@ ``, ``<unk>``), whitespace and punctuation, is copied
byte for byte, so the counterfactual of a chunk tokenizes to about the same length as the chunk.

Two words are grammatically ambiguous and are resolved from the next word, with small word lists
(fast and good enough on encyclopaedic text; a tagger would be 100x slower):

* ``her`` is a possessive determiner before a noun or adjective (``her book`` -> ``his book``) and an
  object elsewhere (``told her .``, ``gave her a``, ``with her and`` -> ``him``);
* ``his`` is a determiner before a noun (``his book`` -> ``her book``) and an independent possessive
  elsewhere (``the book is his .`` -> ``hers``).

Non-binary subjects are not swapped: CDA is a swap between the two sides of `lexicon.GENDER_PAIRS`,
and singular "they" / "them" / "their" (`lexicon.NONBINARY_WORDS`), gender-neutral nouns ("the
person") and unisex names ("Alex") have no counterpart there, so a sentence about a non-binary
subject comes back unchanged (and `gender_of` calls it ``none``). Stage 01 marks such units
``nonbinary`` from the controlled corpus and never gives them a counterfactual row
(`units.build_units`). `counterfactual` of a sentence that names both a non-binary and a binary person
swaps only the binary words.

The regex is a trie of the words (shared prefixes factored) so a failed match costs a character
test or two per position; that keeps throughput above 5 MB/s on one core (about 10 MB/s on WikiText).
"""
from __future__ import annotations

import re
from typing import Iterable

from . import lexicon


class CDAError(ValueError):
    """Bad input to a CDA function."""


# Words after which ``her`` is an object pronoun (so it becomes ``him``) and after which ``his`` stands
# alone (so it becomes ``hers``): prepositions, determiners, conjunctions, pronouns, auxiliaries,
# adverbs and frequent verbs. Anything else (a noun, an adjective, a number, an unknown word) marks a
# possessive determiner. Words that often follow a possessive ("his home", "his past", "her only
# child", "his later years", "her back") are left out on purpose.
_FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any no every each another such what which whose whom who
    and or but nor so yet for if then than as because although though while whereas unless until
    when where whether since once after before
    of in on at to from by with without about into onto upon over under above below between among
    through throughout during against toward towards across along around behind beyond near off out
    up down inside outside within via per like unlike despite except amid
    is was were are be been being am has had have having do does did done will would shall should
    can could may might must not n't 's 'd 'll 're 've
    i me my you your he him his she her it its we us our they them their one ones there here
    himself herself itself themselves myself yourself ourselves
    also too very just even still again already always never often soon once now then
    away together alone instead anyway well perhaps rather almost quite
    """.split()
)
# Verbs that commonly follow object ``her`` ("made her cry", "let her go"); verbs that are also
# frequent nouns after a possessive ("her work", "her return", "her smile") are left out.
_VERBS_AFTER_OBJECT = frozenset(
    """
    be become go come stay cry sing die feel seem know think see hear find get take give make let
    tell ask say speak talk try want need do have write read walk sit stand marry
    """.split()
)
_OBJECT_CONTEXT = _FUNCTION_WORDS | _VERBS_AFTER_OBJECT


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex alternation of ``words`` with common prefixes factored out, longest match first."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict) -> str:
        ends_here = "" in node
        branches = [re.escape(char) + render(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends_here:
            # Longer words first: an optional tail is greedy, then the shorter word matches.
            body = "(?:" + body + ")?"
        return body

    return render(trie)


def _build_mapping(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Lower-case word -> counterpart; the first pair that names a word decides (see lexicon)."""
    mapping: dict[str, str] = {}
    for male, female in pairs:
        mapping.setdefault(male, female)
        mapping.setdefault(female, male)
    return mapping


_WORD_MAP = _build_mapping(lexicon.GENDER_PAIRS)
_NAME_MAP = _build_mapping(lexicon.NAME_PAIRS)
_WORD_AND_NAME_MAP = {**_NAME_MAP, **_WORD_MAP}
_AMBIGUOUS = {"her", "his"}


def _whole_words(words: Iterable[str], any_case: bool) -> re.Pattern[str]:
    """Regex of ``words`` as whole words: lower, Title and UPPER forms, or any case if ``any_case``.

    A word must not touch a word character (letter, digit, underscore) on either side, so "history"
    and "Hershey" are left alone while "man's" and "she-wolf" still match. Listing the three case
    forms instead of ``re.IGNORECASE`` makes the scan about twice as fast (no per-character folding).
    """
    words = set(words)
    if any_case:
        return re.compile(r"(?<!\w)" + _trie_pattern(words) + r"(?!\w)", re.IGNORECASE)
    forms = {form for word in words for form in (word, word[:1].upper() + word[1:], word.upper())}
    return re.compile(r"(?<!\w)" + _trie_pattern(forms) + r"(?!\w)")


# CDA swaps the case forms real text uses (he, He, HE); counts accept any case ("hE" too).
_WORD_RE = _whole_words(_WORD_MAP, any_case=False)
_WORD_AND_NAME_RE = _whole_words(_WORD_AND_NAME_MAP, any_case=False)
_ANY_CASE_WORD_RE = _whole_words(_WORD_MAP, any_case=True)
_ANY_CASE_WORD_AND_NAME_RE = _whole_words(_WORD_AND_NAME_MAP, any_case=True)
_IS_FEMALE = {word: True for word in lexicon.FEMALE_WORDS} | {word: False for word in lexicon.MALE_WORDS}
_IS_FEMALE_WITH_NAMES = (
    {name: True for name in lexicon.FEMALE_NAMES} | {name: False for name in lexicon.MALE_NAMES} | _IS_FEMALE
)
# The next word after a match: optional spaces, then a word (with an inner apostrophe) or one symbol.
# WikiText's <unk> stands for a rare word (mostly a name or noun), so it counts as a word.
_NEXT_TOKEN_RE = re.compile(r"[ \t]*(<unk>|[^\W_]+(?:'[^\W_]+)?|'[a-z]+|\S)?", re.IGNORECASE)


def _match_case(source: str, target: str) -> str:
    """``target`` written in the case pattern of ``source``: lower, Title or UPPER."""
    if source.islower():
        return target
    if source.isupper() and len(source) > 1:
        return target.upper()
    if source[:1].isupper():
        return target[:1].upper() + target[1:]
    return target


def _resolve_ambiguous(word: str, text: str, end: int) -> str:
    """``his`` -> her/hers and ``her`` -> his/him from the word that follows position ``end``."""
    next_match = _NEXT_TOKEN_RE.match(text, end)
    next_token = next_match.group(1) if next_match else None
    if next_token is None:
        object_like = True  # end of text
    elif next_token == "<unk>":
        object_like = False
    elif next_token == '"':
        # An opening quote before a title or phrase is possessive (his " Hung Up " video); a closing
        # quote followed by punctuation or the end ends an object (gave it to her " .).
        after_quote = _NEXT_TOKEN_RE.match(text, next_match.end()).group(1)
        object_like = after_quote is None or not after_quote[0].isalnum()
    elif not next_token[0].isalnum():
        # Punctuation or a WikiText marker (" @-@ ", " @,@ "): the pronoun closes a phrase.
        object_like = True
    else:
        object_like = next_token.lower() in _OBJECT_CONTEXT
    if word == "her":
        return "him" if object_like else "his"
    return "hers" if object_like else "her"


def counterfactual(text: str, swap_names: bool = False) -> str:
    """``text`` with every gendered word (and first name if ``swap_names``) swapped, case kept."""
    if not isinstance(text, str):
        raise CDAError(f"text must be a str, got {type(text).__name__}")
    pattern = _WORD_AND_NAME_RE if swap_names else _WORD_RE
    mapping = _WORD_AND_NAME_MAP if swap_names else _WORD_MAP

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        lower = word.lower()
        if lower in _AMBIGUOUS:
            target = _resolve_ambiguous(lower, text, match.end())
        else:
            target = mapping[lower]
        return _match_case(word, target)

    return pattern.sub(replace, text)


def gendered_counts(text: str, include_names: bool = False) -> tuple[int, int]:
    """(female, male) counts of lexicon words in ``text``: whole words, any case.

    First names count only with ``include_names`` (mirroring ``counterfactual``'s ``swap_names``),
    so a text's gender says what CDA will flip.
    """
    if not isinstance(text, str):
        raise CDAError(f"text must be a str, got {type(text).__name__}")
    pattern, is_female = (
        (_ANY_CASE_WORD_AND_NAME_RE, _IS_FEMALE_WITH_NAMES) if include_names else (_ANY_CASE_WORD_RE, _IS_FEMALE)
    )
    # IGNORECASE also matches look-alikes ("ſhe" with a long s, "HİM" with a dotted I); casefold maps
    # most back to a lexicon word, and the rest are not counted.
    genders = [is_female.get(word.casefold()) for word in pattern.findall(text)]
    return genders.count(True), genders.count(False)


def gender_of(text: str, include_names: bool = False) -> str:
    """``female``, ``male``, ``mixed`` or ``none`` from the gendered words ``text`` contains."""
    female, male = gendered_counts(text, include_names)
    if female and male:
        return "mixed"
    if female:
        return "female"
    if male:
        return "male"
    return "none"
