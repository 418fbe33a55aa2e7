"""`make bench` steps for structured output: what constrained decoding costs, and OpenAI conformance side by side.

- `constrained_decoding_cost`: the LLM service on each backend, closed-loop chat clients at the
  largest client count, the same questions with and without a JSON schema (`response_format`),
  in the same run. The schema asks for a string of at least 400 characters, so a constrained answer
  cannot end before NEW_TOKENS tokens either: both sides make exactly NEW_TOKENS tokens per request
  (checked on `usage`), and the tokens/s ratio is the cost of the masks (target: >= 0.85).
- `live_check_peers`: `parley check --live` against the LLM service (the default llama.cpp
  backend) and against llama.cpp's own `llama-server` (`--jinja`, the same weights the service runs by default) when
  `make bench` built it; both tables side by side in `bench/results/live-check-<time>.md`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from datetime import datetime, timezone

import requests

from bench.common import MODEL_NAME, QUESTIONS, REPO_ROOT, VENV_BIN, BenchContext, Measurement, chat_messages, free_port, server_process, wait_ready
from bench.load import run_closed_loop
from bench.service_steps import REQUEST_TIMEOUT_SECONDS, SERVICE_DIR

STORY_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 400}},
            "required": ["title", "story"],
        },
    },
}
BACKENDS = ("llama_cpp", "transformers")


def _system(backend: str, constrained: bool) -> str:
    return f"{backend} chat {'json_schema' if constrained else 'unconstrained'}"


def _payload(new_tokens: int, constrained: bool):
    def payload(index: int) -> dict:
        body = {
            "model": MODEL_NAME,
            "messages": chat_messages(QUESTIONS[index % len(QUESTIONS)]),
            "max_tokens": new_tokens,
            "temperature": 0,
        }
        if constrained:
            body["response_format"] = STORY_FORMAT
        return body

    return payload


def _parley(ctx: BenchContext, backend: str, log_name: str, slots: int):
    port = free_port()
    env = {
        "SERVICE_PORT": str(port), "PRETRAINED_MODEL_NAME_OR_PATH": MODEL_NAME, "BACKEND": backend,
        "MAX_BATCH_SIZE": str(slots), "GUNICORN_THREADS": str(max(8, 2 * slots)),
    }
    command = [str(VENV_BIN / "gunicorn"), "server:app"]
    return server_process(command, port=port, cwd=SERVICE_DIR, env=env, log_path=REPO_ROOT / "bench/results" / log_name)


def constrained_decoding_cost(ctx: BenchContext) -> None:
    clients = max(ctx.client_counts)
    for backend in BACKENDS:
        if backend == "llama_cpp" and not _has_llama_cpp():
            ctx.progress("constrained decoding on llama.cpp: skipped, llama-cpp-python is not installed")
            continue
        ctx.progress(f"constrained decoding cost, {backend} backend: starting the service")
        with _parley(ctx, backend, f"structured-{backend}.log", clients) as server:
            wait_ready(server)
            url = server.base_url + "/v1/chat/completions"
            for constrained in (False, True):  # warm-up, and the token count both sides rely on
                answer = requests.post(url, json=_payload(ctx.new_tokens, constrained)(0), timeout=REQUEST_TIMEOUT_SECONDS)
                answer.raise_for_status()
                if answer.json()["usage"]["completion_tokens"] != ctx.new_tokens:
                    ctx.progress(f"  WARNING: {_system(backend, constrained)} answered {answer.json()['usage']} tokens")
            for constrained in (False, True):
                system = _system(backend, constrained)
                ctx.progress(f"{system}: {clients} closed-loop clients, {ctx.rounds} requests each")
                stats = run_closed_loop(
                    url, _payload(ctx.new_tokens, constrained), clients, ctx.rounds,
                    tokens_per_request=ctx.new_tokens, timeout_seconds=REQUEST_TIMEOUT_SECONDS,
                )
                ctx.record(Measurement(**asdict(stats), system=system, mode="closed loop"))


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _default_copy():
    """The GGUF the llama.cpp backend runs for the embedded model by default (GGUF_WEIGHTS=auto: a
    copy made once and cached by sha256), so llama-server is checked on the very same weights."""
    from common.model_sources import embedded_model_path, gguf_weights_to_run
    from services.transformers_lm.backends.llama_cpp_backend import converted_copy

    kind = gguf_weights_to_run(MODEL_NAME, "auto")
    return converted_copy(embedded_model_path(MODEL_NAME), kind, REPO_ROOT / ".cache" / "models")


def live_check_peers(ctx: BenchContext) -> None:
    from parley.live_check import CASES, run_live_check

    tables: dict[str, dict[str, tuple[bool, str]]] = {}
    if _has_llama_cpp():
        ctx.progress("live check: the LLM service (llama.cpp backend)")
        with _parley(ctx, "llama_cpp", "live-check-parley.log", 4) as server:
            wait_ready(server)
            results = run_live_check(server.base_url + "/v1", MODEL_NAME)
        tables["parley (llama.cpp backend)"] = {r.name: (r.passed, r.why) for r in results}
    from bench.llama_cpp_steps import find_llama_server

    binary = find_llama_server()
    if binary is None:
        ctx.progress("live check: llama-server not found (make bench builds it): its column is left out")
    else:
        port = free_port()
        model = _default_copy()
        command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--jinja", "-np", "4", "-c", "8192",
                   "-a", MODEL_NAME]
        env = {"LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        ctx.progress(f"live check: llama-server ({binary.name} --jinja on {model.name})")
        with server_process(command, port=port, cwd=REPO_ROOT, env=env, log_path=REPO_ROOT / "bench/results/live-check-llama-server.log") as server:
            wait_ready(server, "/health")
            results = run_live_check(server.base_url + "/v1", MODEL_NAME)
        tables["llama-server --jinja"] = {r.name: (r.passed, r.why) for r in results}
    if not tables:
        return
    ctx.facts["live check"] = {
        system: {"passed": sum(ok for ok, _ in cases.values()), "failed": [n for n, (ok, _) in cases.items() if not ok]}
        for system, cases in tables.items()
    }
    path = REPO_ROOT / "bench" / "results" / f"live-check-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.md"
    path.write_text(live_check_table(tables, [name for name, _ in CASES]))
    for system, summary in ctx.facts["live check"].items():
        ctx.progress(f"  {system}: {summary['passed']}/{len(CASES)} passed; failed: {', '.join(summary['failed']) or 'none'}")
    ctx.progress(f"  table written to {path.relative_to(REPO_ROOT)}")


def live_check_table(tables: dict[str, dict[str, tuple[bool, str]]], cases: list[str]) -> str:
    """A Markdown table: one row per case, one column per server, PASS/FAIL and why."""
    systems = list(tables)

    def cell(result: tuple[bool, str] | None) -> str:
        if result is None:
            return "-"
        passed, why = result
        return f"{'PASS' if passed else '**FAIL**'}: {why.replace('|', '/').replace(chr(10), ' ')[:120]}"

    lines = [
        f"# `parley check --live`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {MODEL_NAME}",
        "",
        "| case | " + " | ".join(systems) + " |",
        "| --- | " + " | ".join("---" for _ in systems) + " |",
    ]
    for case in cases:
        lines.append(f"| {case} | " + " | ".join(cell(tables[system].get(case)) for system in systems) + " |")
    return "\n".join(lines) + "\n"


def targets(ctx: BenchContext) -> list[dict]:
    """Constrained decoding costs at most 15 % of the tokens/s at the largest client count."""
    checks = []
    clients = max(ctx.client_counts)
    for backend in BACKENDS:
        free = next((m for m in ctx.measurements if m.system == _system(backend, False) and m.clients == clients), None)
        constrained = next((m for m in ctx.measurements if m.system == _system(backend, True) and m.clients == clients), None)
        if free and constrained and free.tokens_per_second:
            ratio = constrained.tokens_per_second / free.tokens_per_second
            checks.append({
                "target": f"{backend}: constrained (json_schema) tok/s vs unconstrained at {clients} clients",
                "measured": ratio, "goal": ">= 0.85", "met": ratio >= 0.85,
            })
    return checks


STEPS = [constrained_decoding_cost, live_check_peers]
