"""CDA swaps exactly the gendered words: case, markup, sub-words, her/his roles, real WikiText."""
import re
import time

import pytest

from dpbias_utils.data import lexicon
from dpbias_utils.data.cda import CDAError, counterfactual, gender_of, gendered_counts

AMBIGUOUS = {"her", "his", "hers", "him"}


def _bijective_words() -> set[str]:
    """Lexicon words w with counterfactual(counterfactual(w)) == w by construction of the pairs."""
    forward: dict[str, str] = {}
    for male, female in lexicon.GENDER_PAIRS:
        forward.setdefault(male, female)
        forward.setdefault(female, male)
    return {w for w, c in forward.items() if forward.get(c) == w and w not in AMBIGUOUS}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("he said so .", "she said so ."),
        ("He said so .", "She said so ."),
        ("HE SAID SO", "SHE SAID SO"),
        ("The King and the Queen met .", "The Queen and the King met ."),
        ("my uncle 's house", "my aunt 's house"),
        ("the man's hat", "the woman's hat"),
        ("The MEN and women", "The WOMEN and men"),
        ("Mr. Smith met Mrs. Jones", "Mrs. Smith met Mr. Jones"),
        ("her fiancé and his fiancée", "his fiancée and her fiancé"),
        ("He injured himself .", "She injured herself ."),
        ("a she-wolf", "a he-wolf"),
        ('"He is here," she said.', '"She is here," he said.'),
    ],
)
def test_swaps_words_and_keeps_case(text, expected):
    assert counterfactual(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "the history of the shell company",
        "Hershey mandate heroic themes",
        "womanizer manager Sheffield hisself hermit",
        "Kingston Princeton Manhattan Ohio",
        "ThE sHeLl",
        "hE sHe",  # odd case forms are not swapped (real text has lower, Title and UPPER)
    ],
)
def test_no_swaps_inside_other_words(text):
    assert counterfactual(text) == text


def test_wikitext_markup_and_whitespace_are_untouched():
    text = " The 1 @,@ 000 @-@ year @-@ old king , his <unk> and 2 @.@ 5 queens \t went  home . \n"
    assert counterfactual(text) == " The 1 @,@ 000 @-@ year @-@ old queen , her <unk> and 2 @.@ 5 kings \t went  home . \n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She loved her dog .", "He loved his dog ."),
        ("I gave her a book .", "I gave him a book ."),
        ("I told her .", "I told him ."),
        ("I told her", "I told him"),
        ("with her and her sister", "with him and his brother"),
        ("Her first album sold well", "His first album sold well"),
        ("her own house", "his own house"),
        ("they made her cry", "they made him cry"),
        ("a letter to her , unopened", "a letter to him , unopened"),
        ("her 3 children", "his 3 children"),
        ("The book is his .", "The book is hers ."),
        ("his book", "her book"),
        ("It was his", "It was hers"),
        ("his and the other", "hers and the other"),
        ("The prize is hers .", "The prize is his ."),
        ("He met him .", "She met her ."),
        ("his <unk> brother", "her <unk> sister"),
        ('her " Hung Up " video', 'his " Hung Up " video'),
        ('a gift for her " .', 'a gift for him " .'),
        ("He made his home in Melbourne", "She made her home in Melbourne"),
        ("her only child", "his only child"),
        ("told her <unk> story", "told his <unk> story"),
    ],
)
def test_her_and_his_follow_their_grammatical_role(text, expected):
    assert counterfactual(text) == expected


def test_gn_glove_pairs_in_the_lexicon_swap_both_ways(shared_data):
    folder = shared_data / "wordlists" / "gn_glove"
    male = (folder / "male_word_file.txt").read_text(encoding="utf-8").split("\n")
    female = (folder / "female_word_file.txt").read_text(encoding="utf-8").split("\n")
    pairs = {(m.strip().rstrip("."), f.strip().rstrip(".")) for m, f in zip(male, female) if m.strip()}
    ours = set(lexicon.GENDER_PAIRS)
    shared = sorted((pairs & ours) - {(m, f) for m, f in pairs if {m, f} & AMBIGUOUS})
    assert len(shared) >= 100
    reversible = _bijective_words()
    for m, f in shared:
        assert counterfactual(f"The {m} arrived .") == f"The {f} arrived ."
        assert counterfactual(f"The {m.title()} arrived .") == f"The {f.title()} arrived ."
        if m in reversible and f in reversible:
            assert counterfactual(f"The {f} arrived .") == f"The {m} arrived ."


def test_zhao_generalized_swaps_agree_where_unambiguous(shared_data):
    lines = (shared_data / "wordlists" / "zhao2018" / "generalized_swaps.txt").read_text(encoding="utf-8").split("\n")
    pairs = [tuple(w.strip() for w in line.split("\t")) for line in lines if "\t" in line]
    reversible = _bijective_words()
    checked = 0
    for source, target in pairs:
        source, target = source.rstrip("."), target.rstrip(".")
        if source in reversible and (source, target) in {*lexicon.GENDER_PAIRS, *((f, m) for m, f in lexicon.GENDER_PAIRS)}:
            assert counterfactual(source) == target
            checked += 1
    assert checked >= 40


def test_double_counterfactual_is_identity_on_real_wikitext(shared_data):
    """Lines without the ambiguous pronouns or many-to-one words come back unchanged after two swaps."""
    text = (shared_data / "wikitext" / "wikitext-103.valid.tokens.txt").read_text(encoding="utf-8")
    reversible = _bijective_words()
    word_re = re.compile(r"[^\W\d_]+")
    checked = 0
    for line in text.split("\n")[:1500]:
        words = {w.lower() for w in word_re.findall(line)}
        gendered = words & (lexicon.MALE_WORDS | lexicon.FEMALE_WORDS)
        if not gendered or not gendered <= reversible:
            continue
        swapped = counterfactual(line)
        assert swapped != line
        assert counterfactual(swapped) == line
        assert len(swapped.split(" ")) == len(line.split(" "))
        checked += 1
    assert checked >= 20


def test_real_wikitext_keeps_everything_but_gendered_words(shared_data):
    text = (shared_data / "wikitext" / "wikitext-103.valid.tokens.txt").read_text(encoding="utf-8")[:200_000]
    swapped = counterfactual(text)
    before, after = text.split(" "), swapped.split(" ")
    assert len(before) == len(after)
    gendered = lexicon.MALE_WORDS | lexicon.FEMALE_WORDS
    for old, new in zip(before, after):
        if old != new:
            assert old.lower() in gendered and new.lower() in gendered, (old, new)
    assert text.count("@-@") == swapped.count("@-@") and text.count("<unk>") == swapped.count("<unk>")
    female, male = gendered_counts(text)
    assert gendered_counts(swapped) == (male, female)


def test_names_swap_only_when_asked():
    text = "John met Mary and her brother ."
    assert counterfactual(text) == "John met Mary and his sister ."
    assert counterfactual(text, swap_names=True) == "Mary met John and his sister ."
    assert gender_of("John met Mary .") == "none"
    assert gender_of("John met Mary .", include_names=True) == "mixed"
    assert gendered_counts("Mary sang .", include_names=True) == (1, 0)


@pytest.mark.parametrize(
    "text, counts, gender",
    [
        ("She and her sister met .", (3, 0), "female"),
        ("HE met his KING", (0, 3), "male"),
        ("The queen met the king .", (1, 1), "mixed"),
        ("The history of Sheffield shells .", (0, 0), "none"),
        ("", (0, 0), "none"),
        ("hE met sHe", (1, 1), "mixed"),
    ],
)
def test_counts_and_gender(text, counts, gender):
    assert gendered_counts(text) == counts
    assert gender_of(text) == gender


@pytest.mark.parametrize("function", [counterfactual, gendered_counts, gender_of])
def test_bad_input_is_a_clear_error(function):
    with pytest.raises(CDAError, match="text must be a str"):
        function(None)
    assert issubclass(CDAError, ValueError)


def test_fast_enough_for_big_corpora():
    """A loose floor (the benchmark checks 5 MB/s); catches a regex that backtracks per character."""
    text = "The king said that his daughter , the princess , would marry her fiancé in 1850 . " * 3000
    start = time.perf_counter()
    counterfactual(text)
    assert len(text) / (time.perf_counter() - start) / 1e6 > 1.0


@pytest.mark.parametrize(
    "nonbinary, binary, swapped",
    [
        ("They were described as brilliant .", "She was described as brilliant .", "He was described as brilliant ."),
        ("The person worked as a nurse , and they liked it .", "The man worked as a nurse , and he liked it .",
         "The woman worked as a nurse , and she liked it ."),
        ("The message told them that they were rude .", "The message told her that she was rude .",
         "The message told him that he was rude ."),
        ("Their colleagues found Alex honest .", "His colleagues found John honest .", "Her colleagues found Mary honest ."),
    ],
)
def test_nonbinary_subjects_pass_through_unchanged_while_binary_ones_swap(nonbinary, binary, swapped):
    assert counterfactual(nonbinary, swap_names=True) == nonbinary and gender_of(nonbinary, include_names=True) == "none"
    assert counterfactual(binary, swap_names=True) == swapped
