"""Parley's LLM service as users run it: gunicorn, the embedded model, the transformers backend.

Measures the time from process start to /health ready (with the converted model already cached),
the latency of the first request after ready, and closed-loop load on /respond and
/v1/chat/completions.
"""

from __future__ import annotations

import time

import requests

from bench.closed_loop import run_closed_loop
from bench.common import (
    MODEL_NAME,
    QUESTIONS,
    REPO_ROOT,
    VENV_BIN,
    BenchContext,
    Measurement,
    chat_messages,
    free_port,
    server_process,
    wait_ready,
)

SERVICE_DIR = REPO_ROOT / "services" / "transformers_lm"
REQUEST_TIMEOUT_SECONDS = 900


def respond_sender(base_url: str, new_tokens: int):
    session = requests.Session()

    def send(index: int) -> int:
        body = {
            "dialog_contexts": [[QUESTIONS[index % len(QUESTIONS)]]],
            "configs": [
                {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_return_sequences": 1}
            ],
        }
        response = session.post(base_url + "/respond", json=body, timeout=REQUEST_TIMEOUT_SECONDS)
        response.raise_for_status()
        assert response.json()[0][0], "empty hypothesis"
        return new_tokens  # min_new_tokens = max_new_tokens: exactly this many were generated

    return send


def chat_sender(base_url: str, model: str, new_tokens: int):
    """OpenAI chat completions with greedy decoding; counts the tokens the server reports."""
    session = requests.Session()

    def send(index: int) -> int:
        body = {
            "model": model,
            "messages": chat_messages(QUESTIONS[index % len(QUESTIONS)]),
            "max_tokens": new_tokens,
            "temperature": 0,
        }
        response = session.post(base_url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_SECONDS)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    return send


def measure_closed_loops(ctx: BenchContext, system: str, send) -> None:
    for clients in ctx.client_counts:
        ctx.progress(f"{system}: {clients} closed-loop clients, {ctx.rounds} requests each")
        result = run_closed_loop(send, clients=clients, requests_per_client=ctx.rounds)
        if result.errors:
            ctx.progress(f"  {len(result.errors)} requests failed, first: {result.errors[0]}")
        ctx.record(
            Measurement(
                system, "closed loop", clients, len(result.latencies), result.new_tokens, result.seconds,
                result.latencies, {"errors": len(result.errors)},
            )
        )


def measure_startup(ctx: BenchContext, name: str, server, send) -> None:
    """Ready time, then the first request and a few more at one client, one after another."""
    ready_seconds = wait_ready(server)
    ctx.progress(f"{name}: /health ready {ready_seconds:.1f} s after the process started")
    latencies = []
    for index in range(4):
        sent = time.perf_counter()
        send(index)
        latencies.append(time.perf_counter() - sent)
    ctx.facts[f"{name} startup"] = {
        "ready_seconds": ready_seconds,
        "first_request_seconds": latencies[0],
        "later_requests_seconds": latencies[1:],
    }
    ctx.progress(f"{name}: first request {latencies[0]:.2f} s, later ones {', '.join(f'{s:.2f}' for s in latencies[1:])} s")


def parley_service(ctx: BenchContext) -> None:
    port = free_port()
    env = {
        "SERVICE_PORT": str(port),
        "PRETRAINED_MODEL_NAME_OR_PATH": MODEL_NAME,
        "BACKEND": "transformers",
        "MAX_BATCH_SIZE": str(max(ctx.client_counts)),
    }
    command = [str(VENV_BIN / "gunicorn"), "--config", "python:common.gunicorn_conf", "server:app"]
    ctx.progress(f"parley service: starting gunicorn on port {port}")
    with server_process(command, port=port, cwd=SERVICE_DIR, env=env, log_path=REPO_ROOT / "bench/results/parley-service.log") as server:
        chat = chat_sender(server.base_url, MODEL_NAME, ctx.new_tokens)
        measure_startup(ctx, "parley service", server, chat)
        measure_closed_loops(ctx, "parley /respond", respond_sender(server.base_url, ctx.new_tokens))
        measure_closed_loops(ctx, "parley /v1/chat/completions", chat)


STEPS = [parley_service]
