"""Parley's LLM service as users run it: gunicorn, the embedded model, the transformers backend.

Measures the time from process start to /health ready (with the converted model already cached),
the latency of the first request after ready, and closed-loop load on /respond and
/v1/chat/completions.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import requests

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
from bench.load import greedy_respond_payload, run_closed_loop

SERVICE_DIR = REPO_ROOT / "services" / "transformers_lm"
REQUEST_TIMEOUT_SECONDS = 900
# Requests a closed-loop row takes at least. At 1 client the run's 2 rounds are 2 requests (about
# 0.6 s on llama.cpp) on the first 2 questions, the first just answered by the warm-up: llama-server
# read 122 tok/s on those, and 98 over 16 requests on all the questions.
MIN_REQUESTS_PER_ROW = 8


def chat_payload(model: str, new_tokens: int):
    """OpenAI chat completions, greedy, at most `new_tokens` (the questions' answers all run longer)."""

    def payload(index: int) -> dict:
        question = QUESTIONS[index % len(QUESTIONS)]
        return {"model": model, "messages": chat_messages(question), "max_tokens": new_tokens, "temperature": 0}

    return payload


def respond_payload(new_tokens: int):
    return lambda index: greedy_respond_payload(QUESTIONS[index % len(QUESTIONS)], new_tokens)


def measure_closed_loops(
    ctx: BenchContext, system: str, url: str, payload, counts=None, extra: dict | None = None, rounds: int | None = None
) -> None:
    """Closed-loop clients at each of `counts` (the run's client counts unless given), `rounds` requests
    each (the run's unless given, and at least MIN_REQUESTS_PER_ROW in all), one row each."""
    for clients in counts or ctx.client_counts:
        rounds_here = max(rounds or ctx.rounds, -(-MIN_REQUESTS_PER_ROW // clients))
        ctx.progress(f"{system}: {clients} closed-loop clients, {rounds_here} requests each")
        stats = run_closed_loop(
            url, payload, clients, rounds_here, tokens_per_request=ctx.new_tokens, timeout_seconds=REQUEST_TIMEOUT_SECONDS
        )
        if stats.errors:
            ctx.progress(f"  {len(stats.errors)} requests failed, first: {stats.errors[0]}")
        ctx.record(Measurement(**asdict(stats), system=system, mode="closed loop", extra=extra or {}))


def warm_up_and_measure_chat(
    ctx: BenchContext, system: str, url: str, counts, extra: dict | None = None, rounds: int | None = None
) -> None:
    """One warm-up chat request to `url` (a /v1/chat/completions), then `measure_closed_loops` on it."""
    payload = chat_payload(MODEL_NAME, ctx.new_tokens)
    run_closed_loop(url, payload, 1, 1, tokens_per_request=ctx.new_tokens, timeout_seconds=REQUEST_TIMEOUT_SECONDS)
    measure_closed_loops(ctx, system, url, payload, counts, extra, rounds)


def measure_startup(ctx: BenchContext, name: str, server, chat_url: str, payload) -> None:
    """Ready time, then the first request and a few more at one client, one after another.

    These chat requests also check that every answer has exactly `new_tokens` tokens, which the
    closed-loop runs count on.
    """
    ready_seconds = wait_ready(server)
    ctx.progress(f"{name}: /health ready {ready_seconds:.1f} s after the process started")
    latencies, token_counts = [], []
    for index in range(4):
        sent = time.perf_counter()
        response = requests.post(chat_url, json=payload(index), timeout=REQUEST_TIMEOUT_SECONDS)
        latencies.append(time.perf_counter() - sent)
        response.raise_for_status()
        token_counts.append(response.json()["usage"]["completion_tokens"])
    if set(token_counts) != {ctx.new_tokens}:
        ctx.progress(f"  WARNING: answers had {token_counts} tokens, not {ctx.new_tokens}: tokens/s are overstated")
    ctx.facts[f"{name} startup"] = {
        "ready_seconds": ready_seconds,
        "first_request_seconds": latencies[0],
        "later_requests_seconds": latencies[1:],
        "completion_tokens": token_counts,
    }
    ctx.progress(f"{name}: first request {latencies[0]:.2f} s, later ones {', '.join(f'{s:.2f}' for s in latencies[1:])} s")


def measure_service(ctx: BenchContext, name: str, env: dict[str, str], log_name: str, respond_system: str, chat_system: str) -> None:
    """The LLM service under gunicorn with `env` over the embedded model: startup, then closed loops on both endpoints."""
    port = free_port()
    env = {"SERVICE_PORT": str(port), "PRETRAINED_MODEL_NAME_OR_PATH": MODEL_NAME, **env}
    command = [str(VENV_BIN / "gunicorn"), "server:app"]
    ctx.progress(f"{name}: starting gunicorn on port {port}")
    with server_process(command, port=port, cwd=SERVICE_DIR, env=env, log_path=REPO_ROOT / "bench/results" / log_name) as server:
        chat_url = server.base_url + "/v1/chat/completions"
        chat = chat_payload(MODEL_NAME, ctx.new_tokens)
        measure_startup(ctx, name, server, chat_url, chat)
        measure_closed_loops(ctx, respond_system, server.base_url + "/respond", respond_payload(ctx.new_tokens))
        measure_closed_loops(ctx, chat_system, chat_url, chat)


def parley_service(ctx: BenchContext) -> None:
    env = {"BACKEND": "transformers", "MAX_BATCH_SIZE": str(max(ctx.client_counts))}
    measure_service(ctx, "parley service", env, "parley-service.log", "parley /respond", "parley /v1/chat/completions")


def parley_service_bf16(ctx: BenchContext) -> None:
    """The same service with HALF_PRECISION=true: bfloat16 weights and KV cache on a CPU (AVX512_BF16
    kernels where the CPU has them), against the fp32 rows of `parley_service`."""
    env = {"BACKEND": "transformers", "HALF_PRECISION": "true", "MAX_BATCH_SIZE": str(max(ctx.client_counts))}
    measure_service(ctx, "parley service bf16", env, "parley-service-bf16.log", "parley bf16 /respond", "parley bf16 /v1/chat/completions")


STEPS = [parley_service, parley_service_bf16]
