"""A service told to stop drains (tier: a real gunicorn process on loopback serving the tiny model):
on SIGTERM, as `docker service scale` down sends it, the LLM service finishes the requests it has,
answers new ones 503 (the prompted skill posts those to another replica: test_prompted_skill.py)
and /health 503 `draining`, then exits by itself, long before GUNICORN_GRACEFUL_TIMEOUT; /health counts the requests in
progress (`ongoing_requests`, what the autoscaler reads) throughout."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
import requests

from support.servers import service_server
from support.tiny_model import tiny_model_dir

LONG_ANSWER_TOKENS = 400  # seconds of generation for the tiny model, so requests are in progress when we look
ENV = {
    "SERVICE_NAME": "transformers-lm-tiny", "BACKEND": "transformers", "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
    "PRETRAINED_MODEL_NAME_OR_PATH": str(tiny_model_dir()), "MAX_NEW_TOKENS_CAP": str(LONG_ANSWER_TOKENS),
    "GUNICORN_GRACEFUL_TIMEOUT": "120",
}


def long_request(url: str) -> requests.Response:
    config = {"max_new_tokens": LONG_ANSWER_TOKENS, "min_new_tokens": LONG_ANSWER_TOKENS, "do_sample": False}
    return requests.post(url + "/respond", json={"dialog_contexts": [["Tell me everything."]], "configs": [config]}, timeout=300)


def health(url: str) -> tuple[int, dict]:
    response = requests.get(url + "/health", timeout=10)
    return response.status_code, response.json()


def wait_for(what: str, condition, timeout_seconds: float = 60) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_seconds}s"
        time.sleep(0.05)


def wait_for_ongoing(url: str, count: int) -> None:
    wait_for(f"{count} requests in progress", lambda: health(url)[1]["ongoing_requests"] >= count)


@pytest.fixture
def stopping_llm():
    """An LLM service of its own (this test stops it), its base URL and process."""
    with service_server("transformers_lm", ENV) as server:
        yield server


def test_on_sigterm_the_llm_finishes_its_requests_refuses_new_ones_with_503_then_exits(stopping_llm):
    url, process = stopping_llm.base_url, stopping_llm.process
    idle = health(url)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        # Given three long answers in progress (/health counts them)
        answers = [pool.submit(long_request, url) for _ in range(3)]
        wait_for_ongoing(url, 3)

        # When gunicorn is told to stop, as Docker tells a replica it scales away
        os.kill(process.pid, signal.SIGTERM)
        wait_for("/health says draining", lambda: health(url)[0] == 503)
        status_while_draining, body_while_draining = health(url)
        refused = requests.post(url + "/respond", json={"dialog_contexts": [["Hi"]]}, timeout=30)
        refused_v1 = requests.post(url + "/v1/chat/completions", timeout=30,
                                   json={"model": "transformers-lm-tiny", "messages": [{"role": "user", "content": "Hi"}]})
        still_running = process.poll() is None
        results = [answer.result() for answer in answers]
    exit_code = process.wait(timeout=120)

    # Then the requests it had are answered in full, and new ones were refused in each API's shape
    assert idle[0] == 200 and idle[1]["ongoing_requests"] == 0
    assert still_running
    assert [result.status_code for result in results] == [200, 200, 200]
    assert all(len(result.json()[0][0]) > 50 for result in results)
    assert (status_while_draining, body_while_draining["status"], body_while_draining["ongoing_requests"]) == (503, "draining", 3)
    assert refused.status_code == 503 and "stopping" in refused.json()["error"]["message"]
    assert refused_v1.status_code == 503 and refused_v1.json()["error"]["code"] == "draining"
    # and it stopped by itself once they were answered, not at the grace period's end
    assert exit_code == 0
    log = stopping_llm.log()
    assert "draining: 3 request(s) in progress" in log and "drained: every request answered; stopping" in log
