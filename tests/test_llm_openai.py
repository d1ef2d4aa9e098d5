"""OpenAIBackend against a real HTTP server process (agenttensor.llm.server on 127.0.0.1) that
serves real embedded-model answers, with injected slow responses, 500s, dropped connections,
garbage bodies and responses without logprobs."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from agenttensor.archetypes import ArchetypeEngine, ArchetypeSpec, Attribute
from agenttensor.errors import BackendError
from agenttensor.llm.backends import EmbeddedBackend, HeuristicBackend, OpenAIBackend, build_chat_request
from agenttensor.llm.cache import AnswerCache

pytestmark = pytest.mark.slow

KEY_ENV = "AGENTTENSOR_TEST_LLM_KEY"
PROMPTS = [
    "Is the sky blue on a clear day? Answer Yes or No.",
    "You are a 75 year old woman in Brooklyn. Last week there were 25,000 new COVID-19 cases there. "
    "Will you stay at home this week? Answer Yes or No.",
    "You are a 30 year old man in Queens. Last week there were 3 new COVID-19 cases there. "
    "Will you stay at home this week? Answer Yes or No.",
]
SPEC = ArchetypeSpec(
    attributes=(Attribute("age", ("20", "45", "80")), Attribute("sex", ("man", "woman"))),
    template="You are a {age} year old {sex}. Will you wear a mask on the bus this week? Answer Yes or No.",
)
ATTRS = {"age": torch.tensor([0, 1, 2, 0, 1, 2]), "sex": torch.tensor([0, 0, 0, 1, 1, 1])}


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, KEY_ENV: "test-secret", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agenttensor.llm.server", "--host", "127.0.0.1", "--port", "0",
         "--enable-control", "--api-key-env", KEY_ENV],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    deadline = time.time() + 180
    url = None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        if "listening on" in line:
            url = line.rsplit(" ", 1)[-1].strip()
            break
    if url is None:
        proc.kill()
        pytest.fail("test LLM server did not start")
    yield proc, url
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def control(url, path, payload=None):
    base = url.rsplit("/v1", 1)[0]
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-secret")
    _, url = server
    control(url, "/control/faults", {"faults": []})

    def make(**kw):
        kw = {"api_key_env": KEY_ENV, "timeout_s": 120.0, "max_retries": 2, "backoff_s": 0.05, **kw}
        return OpenAIBackend(url, "smollm2", **kw)

    return make


def test_request_body_asks_for_one_greedy_token_with_logprobs():
    body = build_chat_request("m", "Q?", "be brief", 5)
    assert body["max_tokens"] == 1 and body["temperature"] == 0.0
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]


def test_real_answers_match_the_embedded_model(client):
    backend = client(max_concurrency=3)
    p = backend.option_probabilities(PROMPTS, ["Yes", "No"])
    assert backend.last_errors == [None] * 3 and backend.requests_sent == 3
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    direct = EmbeddedBackend().option_probabilities(PROMPTS, ["Yes", "No"])
    # the server lists the top 20 tokens; the embedded readout sums the whole vocabulary
    np.testing.assert_allclose(p, direct, atol=2e-3)
    np.testing.assert_array_equal(p, backend.option_probabilities(PROMPTS, ["Yes", "No"]))


@pytest.mark.parametrize("fault", ["500", "drop", "garbage", "nologprobs", "slow"])
def test_each_fault_is_retried_and_recovered(client, server, fault):
    _, url = server
    # the client's timeout must exceed a normal answer on a loaded 2-core machine
    backend = client(max_concurrency=1, timeout_s=30.0 if fault == "slow" else 120.0)
    good = backend.option_probabilities(PROMPTS[:1], ["Yes", "No"])
    control(url, "/control/faults", {"faults": [fault], "slow_s": 60.0})
    before = backend.requests_sent
    p = backend.option_probabilities(PROMPTS[:1], ["Yes", "No"])
    assert backend.last_errors == [None]
    assert backend.requests_sent - before == 2 and backend.retries == 1
    np.testing.assert_allclose(p, good)


def test_persistent_failures_are_reported_not_zero(client, server):
    _, url = server
    backend = client(max_concurrency=1, max_retries=1)
    control(url, "/control/faults", {"faults": ["500", "500", "nologprobs", "nologprobs"]})
    p = backend.option_probabilities(PROMPTS[:2], ["Yes", "No"])
    assert np.isnan(p).all()
    assert "HTTP 500" in backend.last_errors[0] and "no choices[0].logprobs" in backend.last_errors[1]


def test_wrong_api_key_is_not_retried(client, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    backend = client()
    p = backend.option_probabilities(PROMPTS[:1], ["Yes", "No"])
    assert np.isnan(p).all() and "HTTP 401" in backend.last_errors[0] and backend.requests_sent == 1


def test_engine_failure_policies_over_http(client, server, tmp_path):
    _, url = server
    control(url, "/control/faults", {"faults": ["500"] * 4})
    engine = ArchetypeEngine(SPEC, backend=client(max_concurrency=1, max_retries=1), cache=False)
    with pytest.raises(BackendError, match="2 of 6 archetype prompts failed"):
        engine.decide(ATTRS, {})
    control(url, "/control/faults", {"faults": ["500"] * 2})
    heuristic = HeuristicBackend(lambda codes, env: torch.full(codes["age"].shape, 0.5, dtype=torch.float64))
    engine = ArchetypeEngine(SPEC, backend=client(max_concurrency=1, max_retries=1), cache=False,
                             on_failure="fallback", fallback=heuristic)
    p = engine.decide(ATTRS, {})
    assert engine.stats["failures"] == engine.stats["fallbacks"] == 1
    assert (p == 0.5).sum() == 1 and ((p > 0) & (p < 1)).all()


def test_server_dying_mid_run_loses_no_completed_answers(client, server, tmp_path):
    _, url = server
    cache = AnswerCache(tmp_path / "cache.sqlite")
    # three answers, then the server only returns errors ("dies")
    control(url, "/control/faults", {"faults": ["ok"] * 3 + ["500"] * 100})
    engine = ArchetypeEngine(SPEC, backend=client(max_concurrency=2, max_retries=1), cache=cache, chunk_size=2)
    with pytest.raises(BackendError, match="3 of 6 .*rerun to resume"):
        engine.decide(ATTRS, {})
    assert len(cache) == 3
    control(url, "/control/faults", {"faults": []})
    resumed = ArchetypeEngine(SPEC, backend=client(), cache=cache)
    p = resumed.decide(ATTRS, {})
    assert resumed.stats["calls"] == 3 and resumed.stats["cache_hits"] == 3
    again = ArchetypeEngine(SPEC, backend=client(), cache=cache)
    assert torch.equal(again.decide(ATTRS, {}), p) and again.stats["calls"] == 0


def test_killed_server_is_a_reported_failure(client, server):
    proc, _ = server
    backend = client(max_retries=1, timeout_s=2.0)
    proc.terminate()
    proc.wait(10)
    p = backend.option_probabilities(PROMPTS[:2], ["Yes", "No"])
    assert np.isnan(p).all()
    assert all("failed after 2 attempts" in e for e in backend.last_errors)
