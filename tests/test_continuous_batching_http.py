"""Bounded memory, seen over HTTP: a full engine answers 429 with Retry-After, and a client that goes away frees its slot.

The real service under gunicorn, on the tiny model the tests build, with one batch slot and no
queue, so a second request while one runs is refused at once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from support.servers import service_server
from support.tiny_model import tiny_model_dir

# The tiny model runs to the limit (it never emits its end-of-sequence token here): about 5 s on this
# machine, far longer than the next request takes to arrive.
LONG_ANSWER_TOKENS = 4000


@pytest.fixture(scope="module")
def server():
    env = {
        "PRETRAINED_MODEL_NAME_OR_PATH": str(tiny_model_dir()),
        "BACKEND": "transformers",
        "MAX_BATCH_SIZE": "1",
        "MAX_QUEUE_SIZE": "0",
        "GUNICORN_THREADS": "4",
        "MAX_NEW_TOKENS_CAP": str(LONG_ANSWER_TOKENS),
    }
    with service_server("transformers_lm", env, startup_timeout_seconds=300) as server:
        yield server


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": tiny_model_dir().name,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def post_when_a_slot_is_free(server, body: dict, timeout_seconds: float = 120) -> requests.Response:
    """POST a chat completion, retrying while the service answers 429 (an earlier request still holds the slot)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        response = requests.post(server.url("/v1/chat/completions"), json=body, stream=body["stream"], timeout=60)
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        response.close()
        time.sleep(0.05)


@dataclass
class HeldStream:
    """A streamed answer still being read. Its line iterator is kept: dropping it mid-stream would make
    urllib3 close the connection, and the service would free the slot (as a disconnect should)."""

    response: requests.Response
    lines: Iterator[bytes]

    def close(self) -> None:
        self.response.close()


def start_long_stream(server) -> HeldStream:
    """A streamed answer that holds the only batch slot; returns once its first token arrived."""
    response = post_when_a_slot_is_free(server, chat_body(LONG_ANSWER_TOKENS, stream=True))
    assert response.status_code == 200, response.text
    held = HeldStream(response, response.iter_lines())
    for line in held.lines:
        if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return held
    raise AssertionError("the stream ended before its first token")


def test_a_request_while_the_only_slot_is_busy_gets_429_with_retry_after(server):
    running = start_long_stream(server)
    started = time.monotonic()
    try:
        refused = requests.post(server.url("/v1/chat/completions"), json=chat_body(4), timeout=60)
        answered_after = time.monotonic() - started
        refused_dream = requests.post(server.url("/respond"), json={"dialog_contexts": [["Hi"]]}, timeout=60)
        held_open = not running.response.raw.closed
    finally:
        running.close()

    assert held_open, "the stream holding the slot was closed before the other requests were sent"

    assert refused.status_code == 429, f"answered {refused.status_code} {answered_after:.2f} s after the slot was taken"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused_dream.status_code == 429
    assert int(refused_dream.headers["Retry-After"]) >= 1
    assert "queue" in refused_dream.json()["error"]["message"]


CANCELLED_LOG_LINE = rf"sequence cancelled after (\d+) of {LONG_ANSWER_TOKENS} new tokens"


def test_a_client_that_disconnects_frees_its_slot_for_the_next_request(server):
    running = start_long_stream(server)
    cancelled_before = len(re.findall(CANCELLED_LOG_LINE, server.log()))

    running.close()  # the client goes away mid-answer

    answer = post_when_a_slot_is_free(server, chat_body(4))

    assert answer.status_code == 200, answer.text
    cancelled = [int(n) for n in re.findall(CANCELLED_LOG_LINE, server.log())[cancelled_before:]]
    assert len(cancelled) == 1 and cancelled[0] < LONG_ANSWER_TOKENS  # freed by the disconnect, not by finishing
