"""A small OpenAI-compatible chat-completions server backed by the embedded model.

Serves ``POST /v1/chat/completions`` (one greedy token with ``logprobs``/``top_logprobs`` in the
schema vLLM documents: ``choices[0].logprobs.content[0].top_logprobs``) and ``GET /v1/models``.
Used by the tests and for demos::

    python -m agenttensor.llm.server --port 8765            # then OpenAIBackend("http://127.0.0.1:8765", "smollm2")

With ``--enable-control`` it also accepts ``POST /control/faults`` with
``{"faults": ["ok", "slow", "500", "drop", "garbage", "nologprobs"], "slow_s": 3}``: each following chat
request consumes one fault from the queue (then requests are served normally), and
``GET /control/stats`` returns request counters. It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agenttensor.llm.backends import EmbeddedBackend

log = logging.getLogger(__name__)
FAULTS = ("ok", "slow", "500", "drop", "garbage", "nologprobs")  # "ok": served normally


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: EmbeddedBackend, model_name: str,
                 enable_control: bool = False, api_key: str | None = None):
        super().__init__(address, ChatHandler)
        self.backend = backend
        self.model_name = model_name
        self.enable_control = enable_control
        self.api_key = api_key
        self.model_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.faults: list[str] = []
        self.slow_s = 3.0
        self.stats = {"chat_requests": 0, "answered": 0, "faults_served": 0}

    def next_fault(self) -> str | None:
        with self.state_lock:
            self.stats["chat_requests"] += 1
            if self.faults:
                self.stats["faults_served"] += 1
                return self.faults.pop(0)
        return None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        if not 0 <= k <= 20:
            raise ValueError("top_logprobs must be between 0 and 20")
        with self.model_lock:
            log_probs = self.backend.next_token_log_probs([messages])[0]
            vocabulary = self.backend.vocabulary()
        top = log_probs.topk(max(k, 1))
        ids, values = top.indices.tolist(), top.values.tolist()

        def entry(i: int, lp: float) -> dict[str, Any]:
            text = vocabulary[i]
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        chosen = entry(ids[0], values[0])
        logprobs = None
        if body.get("logprobs"):
            logprobs = {"content": [{**chosen, "top_logprobs": [entry(i, lp) for i, lp in zip(ids[:k], values[:k])]}]}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": chosen["token"]},
                "logprobs": logprobs,
                "finish_reason": "length",
            }],
            "usage": {"prompt_tokens": None, "completion_tokens": 1, "total_tokens": None},
        }


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, payload: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _authorised(self) -> bool:
        if self.server.api_key is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.server.api_key}"

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        elif self.path == "/control/stats" and self.server.enable_control:
            with self.server.state_lock:
                self._send(200, dict(self.server.stats))
        elif self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        try:
            body = self._body()
        except (json.JSONDecodeError, ValueError):
            self._error(400, "body is not JSON")
            return
        if self.path == "/control/faults" and self.server.enable_control:
            faults = [str(f) for f in body.get("faults", [])]
            unknown = sorted(set(faults) - set(FAULTS))
            if unknown:
                self._error(400, f"unknown faults {unknown}; known: {FAULTS}")
                return
            with self.server.state_lock:
                self.server.faults = faults
                self.server.slow_s = float(body.get("slow_s", self.server.slow_s))
            self._send(200, {"queued": faults})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        if not self._authorised():
            self._error(401, "missing or wrong API key")
            return
        fault = self.server.next_fault()
        if fault == "500":
            self._error(500, "injected server error")
            return
        if fault == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault == "garbage":
            self._send(200, None, raw=b"<html>upstream proxy error</html>")
            return
        if fault == "slow":
            time.sleep(self.server.slow_s)
        try:
            response = self.server.completion(body)
        except ValueError as exc:
            self._error(400, str(exc))
            return
        if fault == "nologprobs":
            response["choices"][0]["logprobs"] = None
        with self.server.state_lock:
            self.server.stats["answered"] += 1
        self._send(200, response)


def make_server(host: str = "127.0.0.1", port: int = 0, model_name: str = "smollm2",
                enable_control: bool = False, api_key: str | None = None,
                backend: EmbeddedBackend | None = None) -> ChatServer:
    """A ready-to-serve server (port 0 picks a free port: read ``server.server_address``)."""
    return ChatServer((host, port), backend or EmbeddedBackend(), model_name, enable_control, api_key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model-name", default="smollm2")
    parser.add_argument("--enable-control", action="store_true", help="accept /control/* fault injection")
    parser.add_argument("--api-key-env", default=None, help="require 'Bearer $VAR' from clients")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = make_server(args.host, args.port, args.model_name, args.enable_control, api_key)
    with server.model_lock:  # load the model before announcing readiness
        server.backend.vocabulary()
    host, port = server.server_address[:2]
    print(f"agenttensor.llm.server listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
