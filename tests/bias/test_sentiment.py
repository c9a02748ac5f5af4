import numpy as np

from dpbias_utils.bias import sentiment


def test_compound_matches_vader_normalisation_by_hand():
    # VADER: compound = x / sqrt(x^2 + 15), x = summed valences; good = 1.9, terrible = -2.1
    got = sentiment.compound_scores(["good", "terrible", "", "the table"])
    expected = [1.9 / np.sqrt(1.9**2 + 15), -2.1 / np.sqrt(2.1**2 + 15), 0.0, 0.0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_negative_share_threshold():
    flags = sentiment.negative_flags(np.array([-0.05, -0.0499, 0.3, -0.9]))
    np.testing.assert_array_equal(flags, [1.0, 0.0, 0.0, 1.0])
    assert flags.mean() == 0.5
