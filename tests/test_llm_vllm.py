"""VLLMBackend: the real test needs vLLM and a CUDA GPU; the code it shares is tested everywhere."""

import importlib.util
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agenttensor.errors import ConfigError
from agenttensor.llm.backends import VLLMBackend, chat_messages, vllm_sampling_kwargs, vllm_top_logprobs
from agenttensor.llm.readout import probabilities_from_top_logprobs

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def fake_output(entries):
    """A stand-in for vllm.RequestOutput: outputs[0].logprobs[0] = {token_id: Logprob}."""
    logprobs = {i: SimpleNamespace(logprob=lp, rank=i + 1, decoded_token=text) for i, (text, lp) in enumerate(entries)}
    return SimpleNamespace(outputs=[SimpleNamespace(text=entries[0][0], logprobs=[logprobs])])


def test_sampling_kwargs_ask_for_one_greedy_token_with_logprobs():
    assert vllm_sampling_kwargs(20) == {"max_tokens": 1, "temperature": 0.0, "logprobs": 20, "n": 1}


def test_request_output_parsing_feeds_the_shared_readout():
    out = fake_output([("No", math.log(0.5)), (" Yes", math.log(0.2)), ("yes", math.log(0.1)), ("I", math.log(0.1))])
    pairs = vllm_top_logprobs(out)
    probs, mass = probabilities_from_top_logprobs(pairs, ["Yes", "No"])
    assert mass == pytest.approx(0.8)
    np.testing.assert_allclose(probs, [0.375, 0.625])


def test_decoded_token_falls_back_to_the_tokenizer():
    out = fake_output([(None, math.log(0.9))])
    tokenizer = SimpleNamespace(decode=lambda ids: {0: "Yes"}[ids[0]])
    assert vllm_top_logprobs(out, tokenizer) == [("Yes", pytest.approx(math.log(0.9)))]


def test_missing_logprobs_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="no logprobs"):
        vllm_top_logprobs(SimpleNamespace(outputs=[SimpleNamespace(text="Yes", logprobs=None)]))


def test_chat_messages_shared_with_http_backend():
    assert chat_messages("Q?") == [{"role": "user", "content": "Q?"}]


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed: the missing-vLLM message cannot be exercised")
def test_clear_message_without_vllm():
    backend = VLLMBackend("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert backend.option_probabilities([], ["Yes", "No"]).shape == (0, 2)  # no import for empty batches
    with pytest.raises(ConfigError, match="needs vLLM, which is not installed"):
        backend.option_probabilities(["Is the sky blue? Answer Yes or No."], ["Yes", "No"])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install 'agenttensor[vllm]', needs CUDA)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")
def test_real_vllm_answers():
    model = os.environ.get("AGENTTENSOR_VLLM_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    backend = VLLMBackend(model, gpu_memory_utilization=0.3, max_model_len=512)
    prompts = ["Is the sky blue on a clear day? Answer Yes or No.", "Is fire cold? Answer Yes or No."]
    p = backend.option_probabilities(prompts, ["Yes", "No"])
    assert backend.last_errors == [None, None]
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p, backend.option_probabilities(prompts, ["Yes", "No"]))
