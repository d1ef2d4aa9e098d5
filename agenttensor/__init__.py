"""agenttensor: city-scale agent-based simulation as torch tensors.

Public API (everything else is an implementation module):

- state and parameters: `TensorState`, `Params`, `param`
- randomness and events: `Randomness`, `Hard`, `StraightThrough`, `Relaxed`
- transmission: `GroupLayer`, `message_passing`, `edges_from_networkx`, `edges_to_networkx`
- models and runs: `Model`, `Substep`, `StepContext`, `simulate`, `Results`, `load_model`
- interventions and scenarios: `Intervention`, `LeverSpec`, `Scenario`, `ScenarioSet`, `run_scenarios`,
  `load_scenarios`, `ScenarioResults`
- populations: `Population`, `synthetic`
"""

__version__ = "0.1.0"

from ._malloc import tune as _tune_malloc

_tune_malloc()

from .errors import AgentTensorError, BackendError, ConfigError, InputError
from .model import Model, StepContext, Substep
from .params import Params, param
from .population import Population, synthetic
from .record import PackedLayout, PackedRecord
from .results import Results
from .rng import Randomness
from .sampling import Hard, Relaxed, Sampler, StraightThrough
from .state import TensorState
from .transmission import GroupLayer, edges_from_networkx, edges_to_networkx, message_passing
from .interventions import Intervention, LeverSpec
from .run import simulate
from .loading import load_model
from .scenarios import Scenario, ScenarioResults, ScenarioSet, load_scenarios, run_scenarios

__all__ = [
    "AgentTensorError", "BackendError", "ConfigError", "InputError", "Model", "StepContext", "Substep", "Params",
    "param", "Population", "synthetic", "PackedLayout", "PackedRecord", "Results", "Randomness", "Hard", "Relaxed", "Sampler", "StraightThrough",
    "TensorState", "GroupLayer", "edges_from_networkx", "edges_to_networkx", "message_passing", "simulate",
    "load_model", "Intervention", "LeverSpec", "Scenario", "ScenarioSet", "ScenarioResults", "run_scenarios",
    "load_scenarios", "__version__",
]
