"""Closed-loop load on the LLM service's `/respond`, next to raw `model.generate` on the same model and prompt.

    .venv/bin/python -m bench.load                      # starts the service itself on a free port
    .venv/bin/python -m bench.load --url http://127.0.0.1:8180 --clients 1,4

Every request asks for exactly `--new-tokens` tokens greedily (min_new_tokens = max_new_tokens), so
tokens/s compare like with like. Prints tokens/s and p50/p95 latency per client count, then raw
`generate` and the ratio service / raw at one client. The functions are importable:
`run_closed_loop(url, payload_factory, clients, requests_per_client)` returns `LoadStats`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"
QUESTION = "Write a detailed paragraph about the history of Paris."


@dataclass
class LoadStats:
    """What one closed-loop run measured."""

    clients: int
    requests: int
    seconds: float
    new_tokens: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies, 50)

    @property
    def p95(self) -> float | None:
        return percentile(self.latencies, 95)

    def summary(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k != "latencies"},
            "tokens_per_second": self.tokens_per_second,
            "p50_seconds": self.p50,
            "p95_seconds": self.p95,
        }


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (inclusive method); the value itself for a single sample."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def greedy_respond_payload(question: str, new_tokens: int) -> dict:
    """A `/respond` body asking for exactly `new_tokens` greedy tokens."""
    config = {"do_sample": False, "num_return_sequences": 1, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    return {"dialog_contexts": [[question]], "prompts": [""], "configs": [config]}


def run_closed_loop(
    url: str,
    payload_factory: Callable[[int], dict],
    clients: int,
    requests_per_client: int,
    *,
    tokens_per_request: int,
    timeout_seconds: float = 600,
) -> LoadStats:
    """`clients` threads each POST `payload_factory(i)` to `url`, the next as soon as the last is answered.

    Every client starts at once; the wall time runs from the first request to the last answer.
    A failed request is counted in `errors`, not in tokens or latencies.
    """
    stats = LoadStats(clients=clients, requests=0, seconds=0.0, new_tokens=0)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(number: int) -> None:
        with requests.Session() as session:
            start.wait()
            for round_index in range(requests_per_client):
                sent = time.perf_counter()
                try:
                    response = session.post(url, json=payload_factory(number + round_index * clients), timeout=timeout_seconds)
                    response.raise_for_status()
                except requests.RequestException as error:
                    with lock:
                        stats.errors.append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    stats.requests += 1
                    stats.latencies.append(time.perf_counter() - sent)
                    stats.new_tokens += tokens_per_request

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    stats.seconds = time.perf_counter() - started
    return stats


def run_raw_generate(model_dir: Path, question: str, new_tokens: int, repeats: int) -> LoadStats:
    """Raw transformers `generate` on the same model and the same chat prompt, one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    stats = LoadStats(clients=1, requests=0, seconds=0.0, new_tokens=0)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up, as the service's
        started = time.perf_counter()
        for _ in range(repeats):
            sent = time.perf_counter()
            output = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            stats.latencies.append(time.perf_counter() - sent)
            stats.new_tokens += output.shape[1] - inputs["input_ids"].shape[1]
            stats.requests += 1
        stats.seconds = time.perf_counter() - started
    return stats


def served_model_dir(model: str) -> Path:
    """The directory the service loads `model` from (a GGUF's converted copy, made once if missing)."""
    from common.model_sources import SourceKind, file_sha256, resolve_model_source
    from services.transformers_lm.backends.transformers_backend import converted_gguf_dir
    from services.transformers_lm.settings import Settings

    source = resolve_model_source(model)
    if source.kind is SourceKind.GGUF_FILE:
        return converted_gguf_dir(source.path, Settings().model_cache_dir, file_sha256(source.path))
    if source.kind is SourceKind.LOCAL_DIR:
        return source.path
    raise SystemExit(f"bench.load compares against raw generate on a local model; {model!r} is a hub id")


@contextlib.contextmanager
def started_service(model: str, env: dict[str, str]) -> Iterator[str]:
    """The LLM service under gunicorn on a free port, as `make run` starts it; yields its base URL."""
    from tests.support.servers import free_port, running_server

    port = free_port()
    command = [str(Path(sys.executable).parent / "gunicorn"), "server:app"]
    service_env = {"PRETRAINED_MODEL_NAME_OR_PATH": model, "SERVICE_PORT": str(port), "BACKEND": "transformers", **env}
    with running_server(
        command, port=port, cwd=REPO_ROOT / "services" / "transformers_lm", env=service_env, startup_timeout_seconds=600
    ) as server:
        yield server.base_url


def _row(label: str, stats: LoadStats) -> str:
    p50 = f"{stats.p50:.2f}s" if stats.p50 is not None else "-"
    p95 = f"{stats.p95:.2f}s" if stats.p95 is not None else "-"
    errors = f"  errors: {len(stats.errors)}" if stats.errors else ""
    return f"{label:<28} {stats.tokens_per_second:8.1f} tok/s   p50 {p50:>7}   p95 {p95:>7}   ({stats.requests} requests){errors}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service's base URL (default: start one on a free port)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model the service serves and raw generate loads")
    parser.add_argument("--clients", default="1,4", help="comma-separated client counts, e.g. 1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens every request generates")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the service this started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    client_counts = [int(count) for count in args.clients.split(",") if count.strip()]

    def payload(_: int) -> dict:
        return greedy_respond_payload(QUESTION, args.new_tokens)

    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        base_url = args.url or stack.enter_context(started_service(args.model, {}))
        print(f"service: {base_url}  model: {args.model}  new tokens per request: {args.new_tokens}", flush=True)
        service_rows = {}
        for clients in client_counts:
            stats = run_closed_loop(
                base_url + "/respond", payload, clients, args.requests_per_client, tokens_per_request=args.new_tokens
            )
            service_rows[clients] = stats
            results[f"service x{clients}"] = stats.summary()
            print(_row(f"service /respond x{clients}", stats), flush=True)
        raw = run_raw_generate(served_model_dir(args.model), QUESTION, args.new_tokens, args.requests_per_client)
        results["raw generate x1"] = raw.summary()
        print(_row("raw model.generate x1", raw), flush=True)
    if 1 in service_rows and raw.tokens_per_second:
        ratio = service_rows[1].tokens_per_second / raw.tokens_per_second
        results["ratio service/raw x1"] = {"tokens_per_second": ratio}
        print(f"service / raw at 1 client: {ratio:.2f} (tokens/s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
