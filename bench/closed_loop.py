"""A closed-loop load: N clients, each sending its next request as soon as its last one is answered."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    new_tokens: int = 0
    errors: list[str] = field(default_factory=list)


def run_closed_loop(send: Callable[[int], int], *, clients: int, requests_per_client: int) -> LoadResult:
    """Run `clients` threads that each call `send(request_index)` `requests_per_client` times.

    `send` makes one request and returns the number of new tokens it got. Every client starts at
    once; the wall time runs from the first request to the last answer.
    """
    result = LoadResult(seconds=0.0)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(number: int) -> None:
        start.wait()
        for round_index in range(requests_per_client):
            request_index = number + round_index * clients
            sent = time.perf_counter()
            try:
                tokens = send(request_index)
            except Exception as error:  # noqa: BLE001 - counted and shown, the load goes on
                with lock:
                    result.errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                result.latencies.append(time.perf_counter() - sent)
                result.new_tokens += tokens

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result
