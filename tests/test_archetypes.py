"""Archetype grouping, prompting, broadcast, cache use, failure policy and calibration (no real LLM)."""

import json
import logging

import numpy as np
import pytest
import torch

from agenttensor.archetypes import (
    ArchetypeEngine,
    ArchetypeSpec,
    Archetypes,
    Attribute,
    EnvironmentField,
    example_spec,
)
from agenttensor.errors import BackendError, ConfigError
from agenttensor.llm.backends import HeuristicBackend
from agenttensor.llm.cache import AnswerCache

ENV = {"cases": torch.tensor([1234.0, 5000.0, 300.0, 20.0, 7.0]), "unemployment_rate": 4.5}


class CountingBackend:
    """Deterministic fake LLM: P(Yes) from a hash of the prompt; can fail chosen prompts."""

    model_id = "fake:counting"
    settings = {"backend": "fake"}

    def __init__(self, fail_when=lambda prompt: False, fail_after: int | None = None):
        self.calls = 0
        self.batches = 0
        self.fail_when = fail_when
        self.fail_after = fail_after
        self.last_errors = []

    def option_probabilities(self, prompts, options):
        self.batches += 1
        out = np.empty((len(prompts), len(options)))
        self.last_errors = []
        for i, prompt in enumerate(prompts):
            self.calls += 1
            dead = self.fail_after is not None and self.calls > self.fail_after
            if dead or self.fail_when(prompt):
                out[i] = np.nan
                self.last_errors.append("injected failure")
                continue
            p_yes = (sum(map(ord, prompt)) % 97 + 1) / 99
            out[i] = [p_yes, 1 - p_yes] + [0.0] * (len(options) - 2)
            self.last_errors.append(None)
        return out


def random_attrs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "age_band": torch.randint(0, 9, (n,), generator=g),
        "sex": torch.randint(0, 2, (n,), generator=g, dtype=torch.int32),
        "borough": torch.randint(0, 5, (n,), generator=g, dtype=torch.int16),
        "employment": torch.randint(0, 3, (n,), generator=g, dtype=torch.uint8),
    }


def test_assign_matches_brute_force_grouping():
    spec = example_spec()
    arch = Archetypes(spec)
    attrs = random_attrs(5000)
    attrs["age_band"][attrs["age_band"] == 3] = 4  # leave some archetypes empty
    archetype_of, keys = arch.assign(attrs)
    assert archetype_of.dtype == torch.int32 and keys.dtype == torch.int64
    tuples = list(zip(*(attrs[a.name].tolist() for a in spec.attributes)))
    occupied = sorted(set(tuples))
    assert keys.numel() == len(occupied) < 270
    codes = arch.codes(keys)
    decoded = list(zip(*(codes[a.name].tolist() for a in spec.attributes)))
    assert decoded == occupied  # keys ascending = lexicographic order of attribute codes
    for i in range(0, 5000, 37):
        assert decoded[archetype_of[i]] == tuples[i]
    labels = arch.labels(keys[:1])[0]
    assert labels == {a.name: a.labels[c] for a, c in zip(spec.attributes, occupied[0])}


def test_unique_path_for_huge_key_spaces_agrees(monkeypatch):
    import agenttensor.archetypes as mod

    arch = Archetypes(example_spec())
    attrs = random_attrs(3000, seed=1)
    a1, k1 = arch.assign(attrs)
    monkeypatch.setattr(mod, "MAX_BINCOUNT_KEYS", 10)
    a2, k2 = arch.assign(attrs)
    assert torch.equal(a1, a2) and torch.equal(k1, k2)


def test_bad_inputs_fail_at_the_boundary():
    arch = Archetypes(example_spec())
    attrs = random_attrs(10)
    attrs["borough"][0] = 5
    with pytest.raises(ConfigError, match="borough.*5 labels"):
        arch.assign(attrs)
    with pytest.raises(ConfigError, match="lack 'sex'"):
        arch.assign({"age_band": attrs["age_band"]})
    with pytest.raises(ConfigError, match="unknown field"):
        ArchetypeSpec(attributes=(Attribute("sex", ("man", "woman")),), template="A {sex} in {borugh}")
    with pytest.raises(ConfigError, match="indexed by"):
        ArchetypeSpec(attributes=(Attribute("sex", ("m", "f")),), template="{sex}",
                      environment=(EnvironmentField("cases", indexed_by="borough"),))
    engine = ArchetypeEngine(example_spec(), backend=CountingBackend(), cache=False)
    with pytest.raises(ConfigError, match=r"needs shape \(5,\)"):
        engine.decide(random_attrs(10), {"cases": torch.ones(3), "unemployment_rate": 4.0})
    with pytest.raises(ConfigError, match="lacks 'unemployment_rate'"):
        engine.decide(random_attrs(10), {"cases": torch.ones(5)})


def test_spec_round_trips_through_json():
    spec = example_spec()
    again = ArchetypeSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_prompts_come_from_labels_and_environment():
    engine = ArchetypeEngine(example_spec(), backend=CountingBackend(), cache=False)
    attrs = {"age_band": torch.tensor([6]), "sex": torch.tensor([1]), "borough": torch.tensor([1]),
             "employment": torch.tensor([0])}
    engine.decide(attrs, ENV)
    assert engine.last_prompts == [
        "You are a 60-69 year old woman living in Brooklyn, New York City, and you are employed. "
        "Last week there were 5,000 new reported COVID-19 cases in Brooklyn. "
        "The city's unemployment rate is 4.5%. "
        "Will you stay at home this week instead of going out to work or to shop? Answer Yes or No."
    ]


def test_calls_equal_occupied_archetypes_independent_of_n():
    counts = {}
    for n in (20_000, 200_000):
        backend = CountingBackend()
        engine = ArchetypeEngine(example_spec(), backend=backend, cache=False)
        p = engine.decide(random_attrs(n), ENV)
        assert p.shape == (n,) and p.dtype == torch.float32
        assert backend.batches == 1  # all occupied archetypes in one batch
        counts[n] = (backend.calls, engine.last_step["archetypes"])
    assert counts[20_000] == counts[200_000] == (270, 270)
    small = CountingBackend()
    engine = ArchetypeEngine(example_spec(), backend=small, cache=False)
    engine.decide(random_attrs(300), ENV)  # fewer agents than archetypes: only occupied ones are asked
    assert small.calls == engine.last_step["archetypes"] == engine.last_step["calls"] < 270


def test_broadcast_gives_each_agent_its_archetype_answer():
    backend = CountingBackend()
    engine = ArchetypeEngine(example_spec(), backend=backend, cache=False, chunk_size=1000)
    attrs = random_attrs(2000)
    p = engine.decide(attrs, ENV)
    archetype_of, _ = engine.archetypes.assign(attrs)
    expected = engine.last_option_probabilities[:, 0].float()[archetype_of.long()]
    torch.testing.assert_close(p, expected)
    # agents sharing attributes share the probability; different archetypes differ
    assert len(set(p.tolist())) > 20


def test_cached_rerun_makes_no_calls(tmp_path):
    cache = AnswerCache(tmp_path / "c.sqlite")
    attrs = random_attrs(3000)
    first = ArchetypeEngine(example_spec(), backend=CountingBackend(), cache=cache)
    p1 = first.decide(attrs, ENV)
    assert first.stats["calls"] == 270 and first.stats["cache_hits"] == 0
    backend = CountingBackend()
    second = ArchetypeEngine(example_spec(), backend=backend, cache=tmp_path / "c.sqlite")
    p2 = second.decide(attrs, ENV)
    assert backend.calls == 0 and second.stats["calls"] == 0 and second.stats["cache_hits"] == 270
    assert torch.equal(p1, p2)
    # new environment → new prompts → new calls
    second.decide(attrs, {**ENV, "unemployment_rate": 9.0})
    assert backend.calls == 270


def test_error_policy_raises_and_keeps_completed_answers(tmp_path):
    cache = AnswerCache(tmp_path / "c.sqlite")
    attrs = random_attrs(3000)
    dying = CountingBackend(fail_after=100)  # the "server" dies after 100 answers
    engine = ArchetypeEngine(example_spec(), backend=dying, cache=cache, chunk_size=32)
    with pytest.raises(BackendError, match="170 of 270 archetype prompts failed.*rerun to resume"):
        engine.decide(attrs, ENV)
    assert len(cache) == 100
    resumed_backend = CountingBackend()
    resumed = ArchetypeEngine(example_spec(), backend=resumed_backend, cache=cache)
    resumed.decide(attrs, ENV)
    assert resumed_backend.calls == 170 and resumed.stats["cache_hits"] == 100


def test_fallback_policy_uses_the_heuristic_and_counts(caplog):
    failing = CountingBackend(fail_when=lambda prompt: "Brooklyn" in prompt)
    heuristic = HeuristicBackend(lambda codes, env: torch.full((codes["sex"].numel(),), 0.123, dtype=torch.float64))
    engine = ArchetypeEngine(example_spec(), backend=failing, cache=False, on_failure="fallback", fallback=heuristic)
    attrs = random_attrs(5000)
    with caplog.at_level(logging.WARNING, logger="agenttensor.archetypes"):
        p = engine.decide(attrs, ENV)
    assert engine.stats["failures"] == engine.stats["fallbacks"] == 54  # 9 × 2 × 3 Brooklyn archetypes
    assert "using fallback" in caplog.text
    brooklyn = attrs["borough"] == 1
    assert torch.allclose(p[brooklyn], torch.tensor(0.123))
    assert (p[~brooklyn] != 0.123).all() and (p > 0).all()
    with pytest.raises(ConfigError, match="needs fallback"):
        ArchetypeEngine(example_spec(), backend=failing, cache=False, on_failure="fallback")


def test_calibration_map_is_learnable():
    engine = ArchetypeEngine(example_spec(), backend=CountingBackend(), cache=False, calibrate=True)
    attrs = random_attrs(4000)
    p0 = engine.decide(attrs, ENV)
    raw = engine.last_option_probabilities[:, 0]
    assert torch.allclose(p0.double().unique().sort().values, raw.clamp(1e-6, 1 - 1e-6).unique().sort().values, atol=1e-6)
    loss = (p0.mean() - 0.9) ** 2
    loss.backward()
    assert engine.scale.grad is not None and engine.shift.grad.item() < 0  # raise shift to raise p
    with torch.no_grad():
        engine.shift += 2.0
    p1 = engine.decide(attrs, ENV)
    assert (p1 > p0).all() and engine.stats["calls"] == 2 * 270  # no cache here; with one, 0 new calls
    # finite-difference check of d mean(p) / d shift
    def mean_p(shift):
        with torch.no_grad():
            engine.shift.fill_(shift)
            return engine.decide(attrs, ENV).double().mean().item()
    engine.shift.grad = None
    engine.shift.data.fill_(0.3)
    engine.decide(attrs, ENV).double().mean().backward()
    fd = (mean_p(0.3 + 1e-3) - mean_p(0.3 - 1e-3)) / 2e-3
    assert engine.shift.grad.item() == pytest.approx(fd, rel=1e-3)


def test_heuristic_backend_is_differentiable():
    beta = torch.tensor(0.002, dtype=torch.float64, requires_grad=True)

    def stay_home(codes, env):
        return torch.sigmoid(-2.0 + beta * env["cases"].double() + 0.2 * codes["age_band"].double())

    engine = ArchetypeEngine(example_spec(), backend=HeuristicBackend(stay_home, "stay_home"))
    assert engine.cache is None
    attrs = random_attrs(2000)
    p = engine.decide(attrs, ENV)
    assert engine.stats["calls"] == 0 and ((p >= 0) & (p <= 1)).all()
    p.sum().backward()
    assert beta.grad is not None and beta.grad.item() > 0
    with pytest.raises(ConfigError, match="not prompts"):
        HeuristicBackend(stay_home).option_probabilities(["x"], ["Yes", "No"])


def test_multi_level_options_give_expected_value():
    spec = ArchetypeSpec(
        attributes=(Attribute("sex", ("man", "woman")),),
        template="As a {sex}, how much will you reduce your contacts? Answer None, Some or Most.",
        options=("None", "Some", "Most"),
        option_values=(0.0, 0.5, 1.0),
    )

    class Fixed:
        model_id, settings, last_errors = "fixed", {}, []

        def option_probabilities(self, prompts, options):
            return np.tile([0.2, 0.5, 0.3], (len(prompts), 1))

    engine = ArchetypeEngine(spec, backend=Fixed(), cache=False)
    p = engine.decide({"sex": torch.tensor([0, 1, 1])}, {})
    torch.testing.assert_close(p, torch.full((3,), 0.55))


def test_rows_that_do_not_sum_to_one_are_failures():
    class Broken:
        model_id, settings, last_errors = "broken", {}, []

        def option_probabilities(self, prompts, options):
            return np.zeros((len(prompts), len(options)))  # a silent 0 must not pass

    engine = ArchetypeEngine(example_spec(), backend=Broken(), cache=False)
    with pytest.raises(BackendError, match="unusable probabilities"):
        engine.decide(random_attrs(100), ENV)


def test_grouping_is_reused_only_for_unchanged_attribute_tensors():
    backend = CountingBackend()
    engine = ArchetypeEngine(example_spec(), backend=backend, cache=False)
    attrs = random_attrs(1000)
    p1 = engine.decide(attrs, ENV)
    assert engine.last_step["grouping_reused"] is False
    p2 = engine.decide(attrs, ENV)
    assert engine.last_step["grouping_reused"] is True and torch.equal(p1, p2)
    attrs["employment"][:500] = 1  # in-place change → regroup
    p3 = engine.decide(attrs, ENV)
    assert engine.last_step["grouping_reused"] is False
    fresh = ArchetypeEngine(example_spec(), backend=CountingBackend(), cache=False).decide(attrs, ENV)
    assert torch.equal(p3, fresh)
    engine.decide({**attrs, "sex": attrs["sex"].clone()}, ENV)  # a new tensor → regroup
    assert engine.last_step["grouping_reused"] is False
