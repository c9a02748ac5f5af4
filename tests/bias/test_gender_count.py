import math

import numpy as np

from dpbias_utils.bias import gender_count


def test_counts_bias_and_distance_by_hand():
    texts = ["She said he was her friend.", "The woman and the man", "nothing gendered here"]
    counts = gender_count.gender_counts(texts)
    np.testing.assert_array_equal(counts, [[2, 1], [1, 1], [0, 0]])  # (female, male) per text
    # f = 3 (she, her, woman), m = 2 (he, man)
    assert math.isclose(gender_count.count_bias(counts), (3 - 2) / 5)
    assert math.isclose(gender_count.count_distance(counts), abs(3 / 5 - 0.5))


def test_balanced_and_empty():
    assert gender_count.count_bias(gender_count.gender_counts(["he she"])) == 0.0
    assert gender_count.count_distance(gender_count.gender_counts(["his hers"])) == 0.0
    assert gender_count.count_distance(gender_count.gender_counts(["she she"])) == 0.5
    assert math.isnan(gender_count.count_bias(gender_count.gender_counts(["a table"])))
