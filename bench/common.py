"""What every benchmark step shares: the prompts, the model, measurements and the run's context."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import requests

from bench.load import LoadStats
# The test suite's helpers for real servers: a free port, and stopping a process group for good.
from tests.support.servers import free_port, stop_process  # noqa: F401 - free_port is re-exported for steps

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MODEL_NAME = "smollm2-135m-instruct"
NEW_TOKENS = 32
CLIENT_COUNTS = (1, 4, 16)
STATIC_BATCH = 16

# Questions whose greedy answers run past NEW_TOKENS, so every request makes exactly NEW_TOKENS
# tokens even where a server cannot be told to ignore the end-of-sequence token.
QUESTIONS = (
    "Write a detailed paragraph about the history of Paris.",
    "Explain in detail how a bicycle works.",
    "Describe the water cycle step by step.",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in a long paragraph.",
    "Describe a typical day in the life of a farmer.",
    "Write a detailed recipe for chocolate chip cookies.",
    "Explain how computers store information.",
    "Describe the planets of the solar system one by one.",
    "Write a letter to a friend about your summer holiday.",
    "Explain the rules of football in detail.",
    "Describe how to plant and care for a tomato garden.",
    "Write a detailed description of a forest in autumn.",
    "Explain how airplanes fly, in several sentences.",
    "Describe the main events of the French Revolution.",
    "Write a motivational speech for students before exams.",
)


@dataclass
class Measurement(LoadStats):
    """One measured configuration: a system, the way it was loaded, and what came out (LoadStats' fields)."""

    system: str = ""  # e.g. "parley /v1/chat/completions", "raw generate", "transformers serve --cb"
    mode: str = ""  # e.g. "closed loop", "sequential", "static batch 16"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second, "p50_seconds": self.p50, "p95_seconds": self.p95}


@dataclass
class BenchContext:
    """Handed to every step: the model directory, the prompts, and where to report progress."""

    model_dir: Path
    new_tokens: int = NEW_TOKENS
    client_counts: tuple[int, ...] = CLIENT_COUNTS
    rounds: int = 2  # closed-loop requests per client
    measurements: list[Measurement] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # startup times, profiles: anything that is not a throughput row
    started: float = field(default_factory=time.monotonic)

    def progress(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    def record(self, measurement: Measurement) -> Measurement:
        self.measurements.append(measurement)
        p50 = f"{measurement.p50:.2f}s" if measurement.p50 is not None else "-"
        self.progress(
            f"  {measurement.system} {measurement.mode} x{measurement.clients}: "
            f"{measurement.tokens_per_second:.1f} tok/s, p50 {p50}"
        )
        return measurement


def chat_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def chat_prompt_ids(loaded, questions) -> list[tuple[int, ...]]:
    """Each question as a one-message chat, rendered by a loaded model's own template and tokenised,
    as the service builds a /v1/chat/completions prompt."""
    from services.transformers_lm.backends import ChatMessage

    return [tuple(loaded.encode(loaded.render_chat([ChatMessage("user", question)]))) for question in questions]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    started_at: float

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def server_process(command: list[str], *, port: int, cwd: Path, env: dict, log_path: Path) -> Iterator[ServerProcess]:
    """A server in its own process group, stopped (group and all) when the block ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        started_at = time.monotonic()
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, started_at)
    try:
        yield server
    finally:
        stop_process(process)


def wait_ready(server: ServerProcess, path: str = "/health", timeout_seconds: float = 600) -> float:
    """Poll until `path` answers 200; return the seconds since the process started."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.base_url} exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(server.base_url + path, timeout=2).status_code == 200:
                return time.monotonic() - server.started_at
        time.sleep(0.05)
    raise TimeoutError(f"{server.base_url}{path} not ready after {timeout_seconds}s:\n{server.log_tail()}")


def run_in_threads(count: int, target: Callable[[int], None]) -> float:
    """`target(0)` ... `target(count - 1)`, each in a thread of its own, all at once; the seconds until the last ends."""
    threads = [threading.Thread(target=target, args=(number,)) for number in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


Step = Callable[[BenchContext], None]
