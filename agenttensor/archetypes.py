"""LLM archetypes: agents grouped by attributes, one LLM prompt per occupied archetype.

A decision step (`ArchetypeEngine.decide`) runs, in this order:

1. **Grouping** — each agent's attribute codes become one mixed-radix key
   (``key = Σ code_a · stride_a``); the occupied keys and each agent's archetype index
   ``archetype_of`` [N] int32 come from a bincount over the key space (``torch.unique`` when
   the key space is too large).
2. **Context** — per occupied archetype: its attribute labels and the environment values it
   sees (a per-category tensor indexed by one of its attributes, or a scalar).
3. **Prompting** — the user-editable template is filled with those labels and values.
4. **Answers** — cached answers are read from the SQLite cache; the remaining prompts go to the
   backend in one batch (written back to the cache chunk by chunk, so an interrupted run keeps
   what it completed). Failed prompts follow ``on_failure``: ``"error"`` raises
   `BackendError`, ``"fallback"`` uses the heuristic's value, counted and logged.
5. **Behaviour** — option probabilities [A, K] → behaviour probability [A] = Σ_k p_k · value_k,
   then the optional calibration map ``sigmoid(scale · logit(p) + shift)``.
6. **Broadcast** — ``p_agent = p_archetype[archetype_of]`` (a gather; gradients reach
   ``scale``/``shift`` and any heuristic parameters).

LLM calls per step = occupied archetypes not yet in the cache, independent of the number of agents.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import string
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agenttensor.errors import BackendError, ConfigError
from agenttensor.llm.backends import Backend, EmbeddedBackend, HeuristicBackend
from agenttensor.llm.cache import AnswerCache, cache_key
from agenttensor.llm.readout import check_options

log = logging.getLogger(__name__)

MAX_BINCOUNT_KEYS = 1 << 24
_STAT_KEYS = ("calls", "cache_hits", "failures", "fallbacks", "llm_seconds", "archetypes", "steps")


@dataclasses.dataclass(frozen=True)
class Attribute:
    """An agent attribute that defines archetypes: codes 0..len(labels)-1, each with a label
    used in prompts (e.g. ``Attribute("sex", ("man", "woman"))``)."""

    name: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.name.isidentifier():
            raise ConfigError(f"attribute name {self.name!r} must be a Python identifier (it is a template field)")
        if not self.labels:
            raise ConfigError(f"attribute {self.name!r} needs at least one label")

    @property
    def radix(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class EnvironmentField:
    """An environment value shown in prompts: a scalar (``indexed_by=None``) or a per-category
    tensor indexed by one attribute's codes (e.g. weekly cases per borough: ``indexed_by="borough"``)."""

    name: str
    indexed_by: str | None = None


@dataclasses.dataclass(frozen=True)
class ArchetypeSpec:
    """Which attributes define archetypes, the prompt template, and the answer options.

    ``template`` is a `str.format` string whose fields are attribute names (filled with the
    archetype's labels), environment field names (filled with numbers; format specs such as
    ``{cases:,.0f}`` work) and ``step``. ``option_values[k]`` is the behaviour value of answer k
    (default: 1 for the first option, 0 for the others, i.e. the probability of answering the
    first option).
    """

    attributes: tuple[Attribute, ...]
    template: str
    options: tuple[str, ...] = ("Yes", "No")
    option_values: tuple[float, ...] | None = None
    environment: tuple[EnvironmentField, ...] = ()
    name: str = "behaviour"

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "environment", tuple(self.environment))
        check_options(self.options)
        values = self.option_values
        if values is None:
            values = (1.0,) + (0.0,) * (len(self.options) - 1)
        values = tuple(float(v) for v in values)
        if len(values) != len(self.options) or any(not 0.0 <= v <= 1.0 for v in values):
            raise ConfigError(
                f"option_values must give one value in [0, 1] per option {self.options}, got {values}"
            )
        object.__setattr__(self, "option_values", values)
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"need one or more distinct attribute names, got {names}")
        env_names = [e.name for e in self.environment]
        if len(set(env_names) | set(names)) != len(env_names) + len(names):
            raise ConfigError(f"environment names {env_names} must differ from each other and from attributes")
        for field in self.environment:
            if field.indexed_by is not None and field.indexed_by not in names:
                raise ConfigError(
                    f"environment field {field.name!r} is indexed by {field.indexed_by!r}, which is not an attribute {names}"
                )
        known = set(names) | set(env_names) | {"step"}
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as exc:
            raise ConfigError(f"prompt template is not a valid format string: {exc}") from exc
        unknown = {f.split(".")[0].split("[")[0] for f in used} - known
        if unknown or "" in used:
            raise ConfigError(
                f"prompt template uses unknown field(s) {sorted(unknown) or ['{}']}; "
                f"known fields: {sorted(known)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready dict (round-trips through `from_dict`)."""
        return {
            "name": self.name,
            "template": self.template,
            "options": list(self.options),
            "option_values": list(self.option_values or ()),
            "attributes": [{"name": a.name, "labels": list(a.labels)} for a in self.attributes],
            "environment": [
                {"name": e.name, **({"indexed_by": e.indexed_by} if e.indexed_by else {})} for e in self.environment
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchetypeSpec:
        try:
            return cls(
                attributes=tuple(Attribute(a["name"], tuple(a["labels"])) for a in data["attributes"]),
                template=data["template"],
                options=tuple(data.get("options", ("Yes", "No"))),
                option_values=tuple(data["option_values"]) if data.get("option_values") else None,
                environment=tuple(EnvironmentField(e["name"], e.get("indexed_by")) for e in data.get("environment", ())),
                name=data.get("name", "behaviour"),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"archetype spec is missing or mistypes a field: {exc}") from exc


class Archetypes:
    """Vectorised grouping of agents into the archetypes of a spec (mixed-radix keys)."""

    def __init__(self, spec: ArchetypeSpec):
        self.spec = spec
        self.radices = [a.radix for a in spec.attributes]
        strides, s = [], 1
        for r in reversed(self.radices):
            strides.append(s)
            s *= r
        self.strides = list(reversed(strides))
        self.n_keys = s

    def keys(self, attributes: Mapping[str, Tensor], validate: bool = True) -> Tensor:
        """Mixed-radix archetype key of each agent: [N] int32 (int64 if the key space needs it)."""
        dtype = torch.int32 if self.n_keys < 2**31 else torch.int64
        key: Tensor | None = None
        for attr, stride in zip(self.spec.attributes, self.strides):
            if attr.name not in attributes:
                raise ConfigError(f"agent attributes lack {attr.name!r} (got {sorted(attributes)})")
            codes = attributes[attr.name]
            if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dim() != 1:
                raise ConfigError(
                    f"attribute {attr.name!r} must be a 1-D integer tensor, got {codes.dtype} {tuple(codes.shape)}"
                )
            if key is not None and codes.shape != key.shape:
                raise ConfigError(f"attribute {attr.name!r} has {codes.numel()} agents, others have {key.numel()}")
            if validate and codes.numel():
                low, high = (int(v) for v in torch.aminmax(codes))
                if low < 0 or high >= attr.radix:
                    raise ConfigError(
                        f"attribute {attr.name!r} has codes in [{low}, {high}] but only {attr.radix} labels {attr.labels}"
                    )
            if key is None:
                key = codes.to(dtype) * stride  # always a fresh tensor: never mutate the caller's
            else:
                key.add_(codes.to(dtype), alpha=stride)
        assert key is not None
        return key

    def assign(self, attributes: Mapping[str, Tensor], validate: bool = True) -> tuple[Tensor, Tensor]:
        """(archetype_of [N] int32 in 0..A-1, occupied keys [A] int64 ascending)."""
        key = self.keys(attributes, validate)
        if self.n_keys <= MAX_BINCOUNT_KEYS:
            counts = torch.bincount(key, minlength=self.n_keys)
            occupied = torch.nonzero(counts, as_tuple=True)[0]
            remap = torch.full((self.n_keys,), -1, dtype=torch.int32, device=key.device)
            remap[occupied] = torch.arange(occupied.numel(), dtype=torch.int32, device=key.device)
            return torch.index_select(remap, 0, key), occupied
        occupied, inverse = torch.unique(key, sorted=True, return_inverse=True)
        return inverse.to(torch.int32), occupied.to(torch.int64)

    def codes(self, keys: Tensor) -> dict[str, Tensor]:
        """Attribute codes of archetype keys: {attribute: [A] int64}."""
        return {
            a.name: torch.div(keys, stride, rounding_mode="floor") % a.radix
            for a, stride in zip(self.spec.attributes, self.strides)
        }

    def labels(self, keys: Tensor) -> list[dict[str, str]]:
        """Attribute labels of archetype keys, one dict per archetype."""
        codes = {name: c.tolist() for name, c in self.codes(keys).items()}
        return [
            {a.name: a.labels[codes[a.name][i]] for a in self.spec.attributes} for i in range(keys.numel())
        ]


def _format_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


class ArchetypeEngine(torch.nn.Module):
    """Behaviour probabilities for every agent from one LLM answer per occupied archetype.

    Parameters
    ----------
    spec: the archetype definition (attributes, template, options).
    backend: an LLM `Backend` (default `EmbeddedBackend()`), or a `HeuristicBackend`.
    cache: an `AnswerCache`, a path to one, ``None`` for the default shared cache file, or
        ``False`` for no cache.
    on_failure: ``"error"`` (raise `BackendError` naming the failed prompts) or ``"fallback"``
        (use ``fallback``'s value for failed archetypes; counted in ``stats["fallbacks"]`` and logged).
    fallback: a `HeuristicBackend` (or a bare callable, wrapped) — required for ``"fallback"``.
    calibrate: apply the learnable map ``sigmoid(scale · logit(p) + shift)`` (``scale``, ``shift``
        are ``torch.nn.Parameter`` scalars initialised to 1 and 0).
    chunk_size: prompts per backend call (default 512: a step is usually one batch); each
        chunk's answers are cached before the next starts, so a failure loses at most one chunk.

    ``stats`` accumulates calls, cache_hits, failures, fallbacks, llm_seconds, archetypes (last
    step), steps; ``last_step`` holds the same for the last step plus the time of each phase.
    """

    def __init__(
        self,
        spec: ArchetypeSpec,
        backend: Backend | HeuristicBackend | None = None,
        cache: AnswerCache | str | bool | None = None,
        on_failure: str = "error",
        fallback: HeuristicBackend | Any = None,
        calibrate: bool = False,
        chunk_size: int = 512,
        eps: float = 1e-6,
    ):
        super().__init__()
        if on_failure not in ("error", "fallback"):
            raise ConfigError(f'on_failure must be "error" or "fallback", got {on_failure!r}')
        if fallback is not None and not isinstance(fallback, HeuristicBackend):
            if not callable(fallback):
                raise ConfigError("fallback must be a HeuristicBackend or a callable(codes, environment)")
            fallback = HeuristicBackend(fallback, name="fallback")
        if on_failure == "fallback" and fallback is None:
            raise ConfigError('on_failure="fallback" needs fallback= (a HeuristicBackend or callable)')
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.spec = spec
        self.archetypes = Archetypes(spec)
        self.backend = backend if backend is not None else EmbeddedBackend()
        if cache is False or isinstance(self.backend, HeuristicBackend):
            self.cache: AnswerCache | None = None
        elif isinstance(cache, AnswerCache):
            self.cache = cache
        else:
            self.cache = AnswerCache(None if cache in (None, True) else cache)
        self.on_failure = on_failure
        self.fallback = fallback
        self.calibrate = calibrate
        self.chunk_size = chunk_size
        self.eps = eps
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.shift = torch.nn.Parameter(torch.tensor(0.0))
        self.register_buffer("option_values", torch.tensor(spec.option_values, dtype=torch.float64), persistent=False)
        self.stats: dict[str, float] = {k: 0 for k in _STAT_KEYS}
        self.stats["llm_seconds"] = 0.0
        self.last_step: dict[str, Any] = {}
        self.last_prompts: list[str] = []
        self.last_option_probabilities: Tensor | None = None
        self._grouping: tuple[Any, ...] | None = None

    # -- context and prompts ------------------------------------------------------------------

    def archetype_environment(self, codes: Mapping[str, Tensor], environment: Mapping[str, Any]) -> dict[str, Tensor]:
        """Environment values per archetype: {field: [A] float}."""
        n = next(iter(codes.values())).numel()
        out = {}
        for field in self.spec.environment:
            if field.name not in environment:
                raise ConfigError(f"environment lacks {field.name!r} (got {sorted(environment)})")
            value = torch.as_tensor(environment[field.name])
            if field.indexed_by is None:
                if value.numel() != 1:
                    raise ConfigError(f"environment {field.name!r} must be a scalar, got shape {tuple(value.shape)}")
                out[field.name] = value.reshape(()).expand(n)
            else:
                radix = next(a.radix for a in self.spec.attributes if a.name == field.indexed_by)
                if value.shape != (radix,):
                    raise ConfigError(
                        f"environment {field.name!r} is indexed by {field.indexed_by!r} and needs shape ({radix},), "
                        f"got {tuple(value.shape)}"
                    )
                out[field.name] = value[codes[field.indexed_by].to(value.device)]
        return out

    def prompts(self, keys: Tensor, env: Mapping[str, Tensor], step: int = 0) -> list[str]:
        """The filled template for each archetype key."""
        labels = self.archetypes.labels(keys)
        values = {name: [_format_number(v) for v in t.detach().double().cpu().tolist()] for name, t in env.items()}
        return [
            self.spec.template.format(**labels[i], **{n: v[i] for n, v in values.items()}, step=step)
            for i in range(len(labels))
        ]

    # -- answers ------------------------------------------------------------------------------

    def _llm_probabilities(self, prompts: list[str], codes: Mapping[str, Tensor], env: Mapping[str, Tensor], step_stats: dict[str, Any]) -> Tensor:
        options = list(self.spec.options)
        backend = self.backend
        keys = [cache_key(backend.model_id, p, options, backend.settings) for p in prompts]
        probs = np.full((len(prompts), len(options)), np.nan)
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        missing = []
        for i, key in enumerate(keys):
            if key in cached and cached[key].shape == (len(options),):
                probs[i] = cached[key]
            else:
                missing.append(i)
        step_stats["cache_hits"] = len(prompts) - len(missing)
        # Each distinct missing prompt is asked once (identical prompts share an answer).
        first_of: dict[str, int] = {}
        for i in missing:
            first_of.setdefault(keys[i], i)
        to_ask = list(first_of.values())
        errors: dict[int, str] = {}
        llm_seconds = 0.0
        for start in range(0, len(to_ask), self.chunk_size):
            chunk = to_ask[start : start + self.chunk_size]
            t0 = time.perf_counter()
            answer = np.asarray(backend.option_probabilities([prompts[i] for i in chunk], options), dtype=np.float64)
            llm_seconds += time.perf_counter() - t0
            reasons = list(getattr(backend, "last_errors", None) or [None] * len(chunk))
            if answer.shape != (len(chunk), len(options)):
                raise BackendError(
                    f"backend {backend.model_id} returned shape {answer.shape}, expected {(len(chunk), len(options))}"
                )
            to_store = []
            for row, i in enumerate(chunk):
                ok = np.isfinite(answer[row]).all() and abs(answer[row].sum() - 1.0) < 1e-6 and (answer[row] >= 0).all()
                if ok:
                    probs[i] = answer[row]
                    to_store.append((keys[i], backend.model_id, prompts[i], options, backend.settings, answer[row]))
                else:
                    errors[i] = reasons[row] if row < len(reasons) and reasons[row] else "unusable probabilities"
            if self.cache is not None:
                self.cache.put_many(to_store)
        for i in missing:  # duplicates of asked prompts
            probs[i] = probs[first_of[keys[i]]]
            if first_of[keys[i]] in errors:
                errors.setdefault(i, errors[first_of[keys[i]]])
        step_stats.update(calls=len(to_ask), llm_seconds=llm_seconds, failures=len(errors), fallbacks=0)
        out = torch.from_numpy(probs)
        if errors:
            failed = sorted(errors)
            summary = "; ".join(f"archetype {i} ({prompts[i][:60]!r}…): {errors[i]}" for i in failed[:3])
            if self.on_failure == "error":
                raise BackendError(
                    f"{len(failed)} of {len(prompts)} archetype prompts failed on {backend.model_id} "
                    f"(completed answers are cached; rerun to resume, or set on_failure='fallback'): {summary}"
                )
            assert self.fallback is not None
            index = torch.tensor(failed)
            fallback = self.fallback.archetype_probabilities(
                {k: v[index] for k, v in codes.items()}, {k: v[index] for k, v in env.items()}, len(options)
            )
            step_stats["fallbacks"] = len(failed)
            log.warning("%s: %d archetype prompt(s) failed, using fallback %s: %s",
                        self.spec.name, len(failed), self.fallback.model_id, summary)
            out = out.to(fallback.dtype if fallback.dtype.is_floating_point else torch.float64)
            out = out.index_put((index,), fallback)
        return out

    def archetype_probabilities(
        self, keys: Tensor, environment: Mapping[str, Any], step: int = 0, step_stats: dict[str, Any] | None = None
    ) -> Tensor:
        """Option probabilities [A, K] for archetype keys [A]."""
        step_stats = {} if step_stats is None else step_stats
        codes = self.archetypes.codes(keys)
        env = self.archetype_environment(codes, environment)
        if isinstance(self.backend, HeuristicBackend):
            step_stats.update(calls=0, cache_hits=0, failures=0, fallbacks=0, llm_seconds=0.0, prompting_s=0.0)
            return self.backend.archetype_probabilities(codes, env, len(self.spec.options))
        t0 = time.perf_counter()
        prompts = self.prompts(keys, env, step)
        step_stats["prompting_s"] = time.perf_counter() - t0
        self.last_prompts = prompts
        return self._llm_probabilities(prompts, codes, env, step_stats)

    def behaviour(self, option_probabilities: Tensor) -> Tensor:
        """Behaviour probability [A] = Σ_k p_k value_k, then the calibration map if enabled."""
        p = option_probabilities @ self.option_values.to(option_probabilities.dtype)
        if not self.calibrate:
            return p
        p = p.clamp(self.eps, 1 - self.eps)
        return torch.sigmoid(self.scale * torch.logit(p) + self.shift)

    def _assign(self, agent_attrs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, bool]:
        """Grouping, reused while the very same attribute tensors are passed unmodified
        (same objects, same storage, same in-place version counter)."""
        names = [a.name for a in self.spec.attributes]
        try:
            token = tuple((id(agent_attrs[n]), agent_attrs[n].data_ptr(), agent_attrs[n]._version) for n in names)
        except (KeyError, AttributeError):
            token = None
        if token is not None and self._grouping is not None and self._grouping[0] == token:
            return self._grouping[1], self._grouping[2], True
        archetype_of, keys = self.archetypes.assign(agent_attrs)
        # keep references so the ids above cannot be reused by new tensors while cached
        self._grouping = (token, archetype_of, keys, tuple(agent_attrs[n] for n in names)) if token else None  # type: ignore[assignment]
        return archetype_of, keys, False

    def decide(self, agent_attrs: Mapping[str, Tensor], environment: Mapping[str, Any], step: int = 0) -> Tensor:
        """Behaviour probability of every agent: [N] float32 in [0, 1].

        agent_attrs: {attribute: [N] int codes}; environment: {field: scalar or [radix] tensor}.
        """
        step_stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        archetype_of, keys, step_stats["grouping_reused"] = self._assign(agent_attrs)
        t1 = time.perf_counter()
        option_probs = self.archetype_probabilities(keys, environment, step, step_stats)
        t2 = time.perf_counter()
        p_archetype = self.behaviour(option_probs).to(torch.float32)
        p_agent = torch.index_select(p_archetype.to(archetype_of.device), 0, archetype_of)
        t3 = time.perf_counter()
        self.last_option_probabilities = option_probs.detach()
        step_stats.update(
            archetypes=int(keys.numel()),
            agents=int(archetype_of.numel()),
            grouping_s=t1 - t0,
            answers_s=t2 - t1,
            broadcast_s=t3 - t2,
        )
        step_stats["step_s_excluding_llm"] = t3 - t0 - step_stats.get("llm_seconds", 0.0)
        self.last_step = step_stats
        for k in ("calls", "cache_hits", "failures", "fallbacks", "llm_seconds"):
            self.stats[k] += step_stats.get(k, 0)
        self.stats["archetypes"] = int(keys.numel())
        self.stats["steps"] += 1
        log.debug("%s step %d: %s", self.spec.name, step, step_stats)
        return p_agent


EXAMPLE_TEMPLATE = (
    "You are a {age_band} year old {sex} living in {borough}, New York City, and you are {employment}. "
    "Last week there were {cases:,} new reported COVID-19 cases in {borough}. "
    "The city's unemployment rate is {unemployment_rate:.1f}%. "
    "Will you stay at home this week instead of going out to work or to shop? Answer Yes or No."
)


def example_spec(template: str = EXAMPLE_TEMPLATE) -> ArchetypeSpec:
    """A stay-at-home decision for New York City: 9 age bands × 2 sexes × 5 boroughs × 3
    employment states = 270 archetypes; environment: weekly cases per borough, unemployment rate."""
    return ArchetypeSpec(
        name="stay_home",
        attributes=(
            Attribute("age_band", ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+")),
            Attribute("sex", ("man", "woman")),
            Attribute("borough", ("the Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island")),
            Attribute("employment", ("employed", "unemployed", "not in the labour force")),
        ),
        template=template,
        options=("Yes", "No"),
        environment=(EnvironmentField("cases", indexed_by="borough"), EnvironmentField("unemployment_rate")),
    )
