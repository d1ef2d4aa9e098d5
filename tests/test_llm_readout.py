"""Readout of option probabilities from next-token log-probabilities."""

import math

import numpy as np
import pytest

from agenttensor.errors import ConfigError
from agenttensor.llm.readout import (
    check_options,
    option_token_matrix,
    probabilities_from_top_logprobs,
    renormalise,
    token_option,
)


def test_variants_of_an_option_are_summed_and_renormalised():
    top = [(" Yes", math.log(0.2)), ("Yes", math.log(0.1)), ("yes", math.log(0.05)), ("No", math.log(0.3)),
           (" no", math.log(0.05)), ("I", math.log(0.2)), ("The", math.log(0.1))]
    probs, mass = probabilities_from_top_logprobs(top, ["Yes", "No"])
    assert mass == pytest.approx(0.7)
    np.testing.assert_allclose(probs, [0.35 / 0.7, 0.35 / 0.7])
    assert probs.dtype == np.float64


def test_prefix_tokens_count_only_when_unambiguous():
    options = check_options(["Low", "Medium", "High"])
    assert token_option("L", options) == 0
    assert token_option(" med", options) == 1
    assert token_option(" HIGH", options) == 2
    assert token_option("Lower", options) == -1  # longer than the option: not a start of it
    assert token_option("  ", options) == -1
    both = check_options(["Stay", "Shop"])
    assert token_option("S", both) == -1  # starts both options
    assert token_option("St", both) == 0


def test_no_option_among_tokens_is_nan_not_zero():
    probs, mass = probabilities_from_top_logprobs([("I", -0.1), ("The", -2.0)], ["Yes", "No"])
    assert mass == 0.0
    assert np.isnan(probs).all()


def test_bad_options_are_rejected_with_a_reason():
    with pytest.raises(ConfigError, match="at least 2"):
        check_options(["Yes"])
    with pytest.raises(ConfigError, match="differ"):
        check_options(["Yes", " yes"])
    with pytest.raises(ConfigError, match="prefix"):
        check_options(["No", "Not sure"])


def test_option_token_matrix_on_a_toy_vocabulary():
    vocabulary = ["Yes", " yes", "No", " NO", "N", "maybe", "", " ", "Y"]
    m = option_token_matrix(vocabulary, ["Yes", "No"])
    assert m.shape == (2, len(vocabulary))
    assert [vocabulary[i] for i in np.nonzero(m[0])[0]] == ["Yes", " yes", "Y"]
    assert [vocabulary[i] for i in np.nonzero(m[1])[0]] == ["No", " NO", "N"]
    with pytest.raises(ConfigError, match="no vocabulary token"):
        option_token_matrix(["Yes", "No"], ["Yes", "Maybe"])


def test_renormalise_marks_low_mass_rows():
    probs = renormalise(np.array([[0.2, 0.6], [1e-9, 1e-9]]), min_mass=1e-6)
    np.testing.assert_allclose(probs[0], [0.25, 0.75])
    assert np.isnan(probs[1]).all()
