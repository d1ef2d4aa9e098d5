"""SEIR on a population: well-mixed or on group layers (household, school, work, community).

Discrete time, one step = one day. Per susceptible agent i on day t

    λ_i(t) = β · m(t) · Σ_l w_l · π_l(i, t)            force of infection (per day)
    P(S→E) = 1 − exp(−λ_i(t))
    P(E→I) = 1 / incubation_days                        geometric stage durations, mean = the
    P(I→R) = 1 / infectious_days                        parameter (days, ≥ 1)

with β = R0 / infectious_days, m(t) the time-varying transmission multiplier, w_l the layer
weights normalised to sum to 1 and π_l(i, t) the infectious share of agent i's contacts in layer
l: I/N for the well-mixed model, the mean over the *other* members of i's group for group layers.
Since an infectious agent spends on average `infectious_days` steps in I exerting hazard β on each
susceptible, the well-mixed model has exactly R0 = β · infectious_days and final size
z = 1 − exp(−R0 z). All flows use the pre-step state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from agenttensor import GroupLayer, Model, Params, StepContext, Substep, TensorState, param
from agenttensor.population import BOROUGHS, Population, synthetic
from agenttensor.transmission import group_sum

LAYERS = ("household", "school", "workplace", "neighbourhood")


@dataclass(frozen=True)
class SEIRParams(Params):
    R0: float = param(2.5, unit="secondary infections", min=0.0, max=50.0, doc="basic reproduction number")
    incubation_days: float = param(3.0, unit="days", min=1.0, doc="mean time in E")
    infectious_days: float = param(5.0, unit="days", min=1.0, doc="mean time in I")
    initial_infected: int = param(10, unit="agents", min=0, doc="agents infectious at step 0")
    mixing: str = param("layered", choices=("well-mixed", "layered"), doc="well-mixed or group layers")
    household_weight: float = param(0.3, min=0.0, doc="relative weight of the household layer")
    school_weight: float = param(0.2, min=0.0, doc="relative weight of the school layer")
    workplace_weight: float = param(0.2, min=0.0, doc="relative weight of the workplace layer")
    neighbourhood_weight: float = param(0.3, min=0.0, doc="relative weight of the neighbourhood layer")
    transmission_multiplier: Tensor = param(torch.ones(1), min=0.0, time_varying=True,
                                            doc="m(t): per-step multiplier of β (last value repeats)")


@dataclass(frozen=True)
class SEIRState(TensorState):
    """Compartment memberships, each [B, N], 0/1 (uint8 in hard mode, float32 in gradient modes)."""

    S: Tensor
    E: Tensor
    I: Tensor
    R: Tensor
    force: Tensor  # [B, N] λ of the current step (observation), float32


@dataclass
class SEIREnv:
    agent_ids: Tensor  # [N] int32
    num_agents: int
    layers: dict[str, GroupLayer]
    borough: Tensor  # [N] int64 group index for per-borough metrics
    group_labels: list[str]


def setup(population: Population | int, params: SEIRParams, device) -> SEIREnv:
    if isinstance(population, int):
        population = synthetic(population, seed=0)
    t = population.tensors(device="cpu")
    layers = {}
    if params.mixing == "layered":
        layers = {name: GroupLayer(t[f"{name}_index"]).to(device) for name in LAYERS}
    labels = list(population.meta.get("borough_names", BOROUGHS)) if population.meta.get("kind") != "synthetic" \
        else list(population.meta.get("boroughs", []))
    num_boroughs = int(t["borough"].max()) + 1 if len(population) else 1
    labels = (labels + [str(i) for i in range(len(labels), num_boroughs)])[:num_boroughs]
    return SEIREnv(agent_ids=t["agent_id"].to(device), num_agents=len(population), layers=layers,
                   borough=t["borough"].to(torch.int64).to(device), group_labels=labels)


def init(env: SEIREnv, params: SEIRParams, ctx: StepContext) -> SEIRState:
    """The `initial_infected` agents with the smallest "seeding" uniforms start in I."""
    u = ctx.uniform("seeding")  # [B, N]
    B, N = u.shape
    k = min(int(params.initial_infected), N)
    I = torch.zeros(B, N, dtype=ctx.sampler.dtype, device=u.device)
    if k:
        I.scatter_(1, torch.topk(u, k, dim=1, largest=False).indices, 1)
    zeros = torch.zeros_like(I)
    return SEIRState(S=1 - I, E=zeros, I=I, R=zeros.clone(), force=torch.zeros(B, N, device=u.device))


def infection_pressure(state: SEIRState, params: SEIRParams, ctx: StepContext) -> SEIRState:
    """observe: λ_i = β m(t) Σ_l w_l π_l(i)."""
    env: SEIREnv = ctx.env
    infectious = state.I.to(torch.float32)
    beta = params.R0 / params.infectious_days * params.at_step("transmission_multiplier", ctx.step)
    if params.mixing == "well-mixed":
        share = infectious.sum(1, keepdim=True) / env.num_agents  # [B, 1]
        return state.replace(force=(beta * share).expand_as(infectious))
    weights = {name: getattr(params, f"{name}_weight") for name in LAYERS}
    total_weight = sum(weights.values())
    pressure = sum(weights[name] * layer.pressure(infectious) for name, layer in env.layers.items())
    return state.replace(force=beta * pressure / total_weight)


def progress(state: SEIRState, params: SEIRParams, ctx: StepContext) -> SEIRState:
    """transition: S→E, E→I, I→R from the pre-step state."""
    S, E, I, R = state.S, state.E, state.I, state.R
    new_E = ctx.hazard_event(state.force, "infection", where=S)
    new_I = ctx.bernoulli(1 / params.incubation_days, "incubation", where=E)
    new_R = ctx.bernoulli(1 / params.infectious_days, "recovery", where=I)
    return state.replace(S=S - new_E, E=E + new_E - new_I, I=I + new_I - new_R, R=R + new_R)


def metrics(previous: SEIRState, state: SEIRState, params: SEIRParams, ctx: StepContext) -> dict[str, Tensor]:
    env: SEIREnv = ctx.env
    count_dtype = torch.float32 if ctx.sampler.differentiable else torch.int64
    new_infections = (previous.S - state.S).to(torch.float32)
    out = {name: getattr(state, name).sum(1, dtype=count_dtype) for name in ("S", "E", "I", "R")}
    out["new_infections"] = new_infections.sum(1).to(count_dtype)
    G = len(env.group_labels)
    if G > 1:
        out["new_infections_by_borough"] = group_sum(new_infections, env.borough, G)
        out["I_by_borough"] = group_sum(state.I.to(torch.float32), env.borough, G)
    return out


def default_population() -> Population:
    return synthetic(200_000, seed=0)


MODEL = Model(
    name="seir",
    params_type=SEIRParams,
    setup=setup,
    init=init,
    substeps=(
        Substep("infection_pressure", "observe", infection_pressure),
        Substep("progress", "transition", progress),
    ),
    metrics=metrics,
    default_population=default_population,
    description=__doc__.splitlines()[0],
)
