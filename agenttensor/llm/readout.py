"""Next-token log-probabilities → probabilities over a small set of answer options.

The answer is read from the distribution of the first token the model would write after the
chat template's assistant prefix, never from parsed free text. A token counts towards an option
when its text, with leading whitespace removed and case folded, is a non-empty prefix of that
option's (case-folded) text and of no other option. So for options ``["Yes", "No"]`` the tokens
``"Yes"``, ``" Yes"``, ``"yes"``, ``" YES"`` and ``"Y"`` all count towards "Yes"; ``"I"`` or
``"The"`` count towards neither. The option masses are then renormalised to sum to 1.

The same rule is used on a full vocabulary (embedded backend: `option_token_matrix`) and on a
server's top-k list (OpenAI-compatible and vLLM backends: `probabilities_from_top_logprobs`),
so the backends agree up to the mass outside the server's top-k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from agenttensor.errors import ConfigError

READOUT_VERSION = "first-token-prefix-v1"
"""Goes into cache keys: change it whenever the readout rule changes."""


def normalise_option(text: str) -> str:
    return text.strip().casefold()


def check_options(options: Sequence[str]) -> list[str]:
    """Validate answer options (≥ 2, non-empty, distinct after case folding); return them normalised."""
    if len(options) < 2:
        raise ConfigError(f"need at least 2 answer options, got {list(options)!r}")
    normalised = [normalise_option(o) for o in options]
    if any(not o for o in normalised):
        raise ConfigError(f"answer options must be non-empty text, got {list(options)!r}")
    if len(set(normalised)) != len(normalised):
        raise ConfigError(
            f"answer options must differ after lower-casing and stripping spaces, got {list(options)!r}"
        )
    for i, a in enumerate(normalised):
        for j, b in enumerate(normalised):
            if i != j and b.startswith(a):
                raise ConfigError(
                    f"answer option {options[i]!r} is a prefix of {options[j]!r}: the first token "
                    "cannot tell them apart; reword the options (e.g. 'Low'/'Medium'/'High')"
                )
    return normalised


def token_option(token_text: str, normalised_options: Sequence[str]) -> int:
    """Index of the option this token's text starts, or -1 (no option, or more than one)."""
    t = token_text.lstrip().casefold()
    if not t:
        return -1
    hits = [k for k, o in enumerate(normalised_options) if o.startswith(t)]
    return hits[0] if len(hits) == 1 else -1


def option_token_matrix(vocabulary: Sequence[str], options: Sequence[str]) -> np.ndarray:
    """[K, V] 0/1 float32 matrix: entry (k, v) is 1 when vocabulary token v counts towards option k."""
    normalised = check_options(options)
    matrix = np.zeros((len(options), len(vocabulary)), dtype=np.float32)
    for v, text in enumerate(vocabulary):
        k = token_option(text, normalised)
        if k >= 0:
            matrix[k, v] = 1.0
    if (matrix.sum(axis=1) == 0).any():
        missing = [o for o, m in zip(options, matrix.sum(axis=1)) if m == 0]
        raise ConfigError(f"no vocabulary token starts the answer option(s) {missing!r}")
    return matrix


def renormalise(mass: np.ndarray, min_mass: float = 0.0) -> np.ndarray:
    """Rows of option masses [P, K] → probabilities; rows with total ≤ min_mass become NaN (failed)."""
    mass = np.asarray(mass, dtype=np.float64)
    total = mass.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = mass / total
    probs[(total <= min_mass).squeeze(-1)] = np.nan
    return probs


def probabilities_from_top_logprobs(
    top_logprobs: Iterable[tuple[str, float]], options: Sequence[str], min_mass: float = 0.0
) -> tuple[np.ndarray, float]:
    """(probabilities [K] float64, option mass) from (token text, log-probability) pairs.

    Duplicate token texts (the same text from two token ids) are summed. If no listed token
    starts any option the probabilities are NaN: the caller counts that as a failure.
    """
    normalised = check_options(options)
    mass = np.zeros(len(options), dtype=np.float64)
    for text, logprob in top_logprobs:
        if logprob is None or not math.isfinite(float(logprob)):
            continue
        k = token_option(str(text), normalised)
        if k >= 0:
            mass[k] += math.exp(float(logprob))
    total = float(mass.sum())
    return renormalise(mass[None, :], min_mass)[0], total
