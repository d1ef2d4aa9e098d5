"""LLM backends, probability readout and the persistent answer cache for archetype decisions.

See `agenttensor/llm/README.md`. The archetype engine itself is `agenttensor.archetypes`.
"""

from agenttensor.llm.backends import (
    Backend,
    EmbeddedBackend,
    HeuristicBackend,
    OpenAIBackend,
    VLLMBackend,
    build_chat_request,
    chat_messages,
    find_smollm2_gguf,
    parse_chat_logprobs,
)
from agenttensor.llm.cache import AnswerCache, cache_key, default_cache_path
from agenttensor.llm.readout import option_token_matrix, probabilities_from_top_logprobs

__all__ = [
    "AnswerCache",
    "Backend",
    "EmbeddedBackend",
    "HeuristicBackend",
    "OpenAIBackend",
    "VLLMBackend",
    "build_chat_request",
    "cache_key",
    "chat_messages",
    "default_cache_path",
    "find_smollm2_gguf",
    "option_token_matrix",
    "parse_chat_logprobs",
    "probabilities_from_top_logprobs",
]
