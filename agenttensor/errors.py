"""Errors raised at the boundary where bad input enters. The CLI prints them as one line."""


class AgentTensorError(Exception):
    """Base class: a user-facing error whose message says what was wrong and how to fix it."""


class ConfigError(AgentTensorError, ValueError):
    """Invalid parameter, option or configuration value."""


class InputError(AgentTensorError, ValueError):
    """Malformed or missing input file (population, targets, scenarios)."""


class BackendError(AgentTensorError, RuntimeError):
    """An LLM backend failed in a way the run cannot recover from under the chosen failure policy."""
