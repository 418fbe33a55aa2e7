"""`make bench` steps for load as a deployment sees it: more clients than the batch, and whole turns.

`many_clients`: the LLM service as `make run` serves the embedded model on each backend (llama.cpp:
its default weights; transformers: fp32), with 64 batch slots, at 16 and then 64 closed-loop
clients on /v1/chat/completions. Its target: 64 clients give >= 1.2x the 16-client throughput with
a p95 at most 4x the 16-client p95 (more clients should fill wider decode steps, not queues).

`agent_turn_overhead`: the universal_prompted_assistant distribution run by `parley up` (agent ->
prompted skill -> LLM service). At 1 user, each turn's latency minus the LLM's own time on that
turn's /respond (read from the LLM's `parley:http_request_duration_seconds` before and after the
turn) is what the agent and the skill add; target: p50 <= 15 ms. At 16 users, the LLM's generated
tokens/s (its `parley:generation_tokens` counter) while users talk through the agent, against the
same LLM answering the same one-utterance dialogs on /respond directly; target: <= 10 % less.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    MODEL_NAME,
    QUESTIONS,
    REPO_ROOT,
    VENV_BIN,
    BenchContext,
    Measurement,
    free_port,
    run_in_threads,
    server_process,
    wait_ready,
)
from bench.service_steps import SERVICE_DIR, warm_up_and_measure_chat

MANY, FEWER = 64, 16
BACKENDS = ("llama_cpp", "transformers")


def scale_system(backend: str) -> str:
    return f"{backend} backend default, 64 slots"


def many_clients(ctx: BenchContext) -> None:
    for backend in BACKENDS:
        if backend == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
            ctx.progress("many clients: llama.cpp is not installed, its backend is skipped")
            continue
        port = free_port()
        env = {
            "SERVICE_PORT": str(port), "PRETRAINED_MODEL_NAME_OR_PATH": MODEL_NAME, "BACKEND": backend,
            "MAX_BATCH_SIZE": str(MANY), "MODEL_CACHE_DIR": str(REPO_ROOT / ".cache" / "models"),
        }
        log = REPO_ROOT / "bench/results" / f"many-clients-{backend}.log"
        ctx.progress(f"many clients: the service on {backend}, {MANY} slots, port {port}")
        with server_process([str(VENV_BIN / "gunicorn"), "server:app"], port=port, cwd=SERVICE_DIR, env=env, log_path=log) as server:
            wait_ready(server)
            # Twice the run's rounds: at 16 clients two rounds last a few seconds, and the first
            # wave's shared prefill weighs on the ratio as much as the steady state does.
            warm_up_and_measure_chat(
                ctx, scale_system(backend), server.base_url + "/v1/chat/completions", (FEWER, MANY), rounds=2 * ctx.rounds
            )


DIST = "universal_prompted_assistant"
LLM_SERVICE = "transformers-lm-smollm2"
TURN_TIMEOUT_SECONDS = 300
THROUGH_AGENT = "agent -> skill -> LLM turns"
LLM_ALONE = "LLM /respond alone, same dialogs"


def _metric(base_url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of a service's /metrics (0 when it is not there yet)."""
    text = requests.get(base_url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def _llm_respond_seconds(llm_url: str) -> float:
    return _metric(llm_url, "parley:http_request_duration_seconds_sum", {"method": "POST", "route": "/respond"})


def _llm_generated_tokens(llm_url: str) -> float:
    return _metric(llm_url, "parley:generation_tokens_total")


def _closed_loop_tokens_per_second(users: int, rounds: int, llm_url: str, one_turn) -> tuple[float, int, list[str]]:
    """`users` threads each doing `rounds` turns; the LLM's generated tokens per wall second."""
    errors: list[str] = []
    lock = threading.Lock()

    def user(number: int) -> None:
        for round_index in range(rounds):
            try:
                one_turn(QUESTIONS[(number + round_index * users) % len(QUESTIONS)])
            except Exception as error:  # noqa: BLE001 - a failed turn is counted and reported, not fatal
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")

    before = _llm_generated_tokens(llm_url)
    seconds = run_in_threads(users, user)
    tokens = int(_llm_generated_tokens(llm_url) - before)
    return tokens / seconds, tokens, errors


def agent_turn_overhead(ctx: BenchContext) -> None:
    from parley.repo import Repo
    from parley.up import run_distribution

    prompt = json.loads((REPO_ROOT / "common/prompts" / f"{DIST}.json").read_text())["prompt"]
    users = max(ctx.client_counts)
    ctx.progress(f"agent turn overhead: starting {DIST} with parley up (free ports)")
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as state, run_distribution(
        Repo(REPO_ROOT), DIST, free_ports=True, overlays=["cpu.yml"], state_dir=Path(state), startup_timeout=600
    ) as running:
        agent_url, llm_url = running.url("agent"), running.url(LLM_SERVICE)

        def through_agent(question: str) -> None:
            # A new user each turn: the skill then sends the LLM a one-utterance dialog, as `alone` does.
            body = {"user_id": f"bench-{uuid.uuid4().hex[:12]}", "payload": question}
            response = requests.post(agent_url + "/", json=body, timeout=TURN_TIMEOUT_SECONDS)
            response.raise_for_status()

        def alone(question: str) -> None:
            body = {"dialog_contexts": [[question]], "prompts": [prompt], "configs": [None]}
            response = requests.post(llm_url + "/respond", json=body, timeout=TURN_TIMEOUT_SECONDS)
            response.raise_for_status()

        through_agent(QUESTIONS[0])  # warm-up: every service's first request
        overheads, turns = [], []
        for question in QUESTIONS:
            llm_before = _llm_respond_seconds(llm_url)
            sent = time.perf_counter()
            through_agent(question)
            turn = time.perf_counter() - sent
            turns.append(turn)
            overheads.append(turn - (_llm_respond_seconds(llm_url) - llm_before))
        overhead_p50_ms = 1000 * statistics.median(overheads)
        ctx.progress(f"  1 user: turn p50 {statistics.median(turns):.2f} s, of which agent and skill {overhead_p50_ms:.1f} ms (p50)")
        rates = {}
        for system, one_turn in ((LLM_ALONE, alone), (THROUGH_AGENT, through_agent), (LLM_ALONE, alone)):
            ctx.progress(f"  {users} users: {system}, {ctx.rounds} turns each")
            rate, tokens, errors = _closed_loop_tokens_per_second(users, ctx.rounds, llm_url, one_turn)
            if errors:
                ctx.progress(f"  {len(errors)} turns failed, first: {errors[0]}")
            rates.setdefault(system, []).append(rate)
            ctx.progress(f"    {rate:.1f} generated tok/s ({tokens} tokens)")
    alone_rate = statistics.mean(rates[LLM_ALONE])  # before and after the agent's run, against drift
    ctx.facts["agent turn overhead"] = {
        "one_user_overhead_p50_ms": overhead_p50_ms,
        "one_user_overheads_ms": [1000 * o for o in overheads],
        "one_user_turn_p50_seconds": statistics.median(turns),
        "users": users,
        "through_agent_tokens_per_second": rates[THROUGH_AGENT][0],
        "llm_alone_tokens_per_second": rates[LLM_ALONE],
        "throughput_loss": 1 - rates[THROUGH_AGENT][0] / alone_rate if alone_rate else None,
    }


def _find(ctx: BenchContext, system: str, clients: int) -> Measurement | None:
    return next((m for m in ctx.measurements if m.system == system and m.clients == clients), None)


def targets(ctx: BenchContext) -> list[dict]:
    checks = []
    for backend in BACKENDS:
        many, fewer = _find(ctx, scale_system(backend), MANY), _find(ctx, scale_system(backend), FEWER)
        if not (many and fewer and fewer.tokens_per_second):
            continue
        ratio = many.tokens_per_second / fewer.tokens_per_second
        checks.append({"target": f"{backend}: {MANY} clients tok/s vs {FEWER}", "measured": ratio, "goal": ">= 1.2", "met": ratio >= 1.2})
        if many.p95 is not None and fewer.p95:
            p95_ratio = many.p95 / fewer.p95
            checks.append({"target": f"{backend}: {MANY} clients p95 vs {FEWER}", "measured": p95_ratio, "goal": "<= 4.0", "met": p95_ratio <= 4.0})
    turn = ctx.facts.get("agent turn overhead")
    if turn:
        overhead = turn["one_user_overhead_p50_ms"]
        checks.append({"target": "agent + skill added to a turn, 1 user, p50 (ms)", "measured": overhead, "goal": "<= 15", "met": overhead <= 15})
        loss = turn["throughput_loss"]
        if loss is not None:
            checks.append({"target": f"throughput lost through the agent, {turn['users']} users", "measured": loss,
                           "goal": "<= 0.10", "met": loss <= 0.10})
    return checks


STEPS = [many_clients, agent_turn_overhead]
