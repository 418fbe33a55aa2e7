"""Prometheus metrics at GET /metrics, exact under gunicorn's threads (tier: real gunicorn processes
on loopback, the LLM on the tiny model; the last tests run in-process).

16 clients at once: the LLM's counters equal the requests it served and the tokens its answers'
`usage` reported (streamed or not), its histograms hold one observation per sequence (and one
inter-token gap per token after the first), and the agent's, the skill's and the LLM's request
counters agree with the turns answered. The engine's gauges read a live sequence while it runs.
"""

from __future__ import annotations

import collections
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import TTFT_BUCKETS
from services.agent.app import create_app as create_agent
from services.agent.settings import Settings as AgentSettings
from support.recording_server import Reply, recording_server
from support.servers import service_server
from support.tiny_model import tiny_model_dir
from support.tiny_stack import DIST_PIPELINE, agent_service, llm_service

CLIENTS = 16
REQUESTS_PER_CLIENT = 4
MODEL = tiny_model_dir().name  # the name it is served under (a path is never a model name)
Samples = dict[tuple[str, frozenset], float]


def scrape(server, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of the service's /metrics, by (name, labels)."""
    answer = requests.get(server.url("/metrics"), headers=headers or {}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(found for (sample, sample_labels), found in samples.items() if sample == name and wanted <= sample_labels)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def chat(server, client: int, number: int) -> dict:
    """One chat completion, streamed every other time; its `usage`."""
    rng = random.Random(client * 100 + number)
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Client {client} asks question {number}."}],
            "max_tokens": rng.randint(2, 16), "temperature": 0.9, "seed": rng.randint(0, 1000)}
    if number % 2:
        body.update(stream=True, stream_options={"include_usage": True})
        with requests.post(server.url("/v1/chat/completions"), json=body, stream=True, timeout=120) as answer:
            assert answer.status_code == 200, answer.text
            events = [line.removeprefix("data: ") for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["usage"]
    answer = requests.post(server.url("/v1/chat/completions"), json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["usage"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """An LLM service of this module's own, so its counters start at zero."""
    with llm_service(tmp_path_factory.mktemp("metrics"), SERVICE_NAME="transformers-lm-metrics") as server:
        yield server


@pytest.fixture(scope="module")
def served(llm):
    """16 clients, 4 chat completions each, at once; then the LLM's metrics."""
    with ThreadPoolExecutor(CLIENTS) as pool:
        usages = list(pool.map(lambda job: chat(llm, *job), [(c, n) for c in range(CLIENTS) for n in range(REQUESTS_PER_CLIENT)]))
    return usages, scrape(llm)


def test_http_requests_count_every_request_by_route_and_status_under_16_clients(served):
    usages, samples = served

    assert value(samples, "parley:http_requests_total", method="POST", route="/v1/chat/completions", status="200") \
        == len(usages) == CLIENTS * REQUESTS_PER_CLIENT
    assert value(samples, "parley:http_request_duration_seconds_count", route="/v1/chat/completions") == len(usages)


def test_token_counters_equal_the_tokens_the_answers_reported(served):
    usages, samples = served
    labels = {"model_name": MODEL}

    assert value(samples, "parley:generation_tokens_total", **labels) == sum(u["completion_tokens"] for u in usages)
    assert value(samples, "parley:prompt_tokens_total", **labels) == sum(u["prompt_tokens"] for u in usages)
    # Every sequence looked its prompt up in the prefix cache once; what it found is a part of that.
    assert value(samples, "parley:prefix_cache_queries_total", **labels) == sum(u["prompt_tokens"] for u in usages)
    assert 0 <= value(samples, "parley:prefix_cache_hits_total", **labels) <= sum(u["prompt_tokens"] for u in usages)


def test_each_sequence_is_one_success_and_one_observation_of_each_latency(served):
    usages, samples = served
    sequences, tokens = len(usages), sum(u["completion_tokens"] for u in usages)

    successes = {reason: value(samples, "parley:request_success_total", finished_reason=reason) for reason in ("stop", "length", "abort")}
    assert sum(successes.values()) == sequences and successes["abort"] == 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(samples, f"parley:{histogram}_count", model_name=MODEL) == sequences, histogram
    assert value(samples, "parley:inter_token_latency_seconds_count", model_name=MODEL) == tokens - sequences
    # vLLM's buckets, so dashboards made for it read the same quantiles.
    assert value(samples, "parley:time_to_first_token_seconds_bucket", le=str(TTFT_BUCKETS[-1])) == sequences


def test_the_engine_gauges_read_a_live_sequence_and_fall_back_to_zero(llm_with_room):
    # min_tokens: the tiny model's random weights could pick its end token within a few steps.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000, "min_tokens": 4000,
            "temperature": 0, "stream": True}
    with requests.post(llm_with_room.url("/v1/chat/completions"), json=body, stream=True, timeout=120) as answer:
        # The first event (the role chunk): the sequence is queued or in the batch. The line iterator is
        # kept: dropping it would close the chunked response, and the service would cancel the sequence.
        events = answer.iter_lines()
        next(events)
        # It runs, and its keys and values are in the cache once its prompt was computed, a step later
        # at most (on a busy machine, seconds later).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = scrape(llm_with_room)
            if value(live, "parley:num_requests_running", model_name=MODEL) and value(live, "parley:kv_cache_usage_perc", model_name=MODEL):
                break
            time.sleep(0.05)
        del events
    # The client left: the service cancels the sequence, and the engine frees its slot at its next step.
    deadline = time.monotonic() + 60
    while value(idle := scrape(llm_with_room), "parley:num_requests_running", model_name=MODEL) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert value(live, "parley:num_requests_running", model_name=MODEL) == 1
    assert value(live, "parley:num_requests_waiting", model_name=MODEL) == 0
    assert 0 < value(live, "parley:kv_cache_usage_perc", model_name=MODEL) <= 1
    assert value(idle, "parley:num_requests_running", model_name=MODEL) == 0
    assert value(idle, "parley:kv_cache_usage_perc", model_name=MODEL) == 0
    assert value(idle, "parley:request_success_total", finished_reason="abort") == 1  # what it was sent counts


@pytest.fixture(scope="module")
def llm_with_room():
    env = {"PRETRAINED_MODEL_NAME_OR_PATH": str(tiny_model_dir()), "BACKEND": "transformers", "MAX_NEW_TOKENS_CAP": "4000",
           "OMP_NUM_THREADS": "1", "DEVICE": "cpu"}
    with service_server("transformers_lm", env) as server:
        yield server


def test_agent_skill_and_llm_count_the_same_turns_under_16_users(tmp_path, tiny_llm, tiny_skill):
    before_skill, before_llm = scrape(tiny_skill), scrape(tiny_llm)
    with agent_service(tmp_path, tiny_skill, tmp_path / "state.sqlite3") as agent:
        def talk(user: int) -> list[dict]:
            return [requests.post(agent.url("/"), json={"user_id": f"metrics-{user}", "payload": f"Turn {n}"}, timeout=120).json()
                    for n in range(2)]

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [answer for answers in pool.map(talk, range(CLIENTS)) for answer in answers]
        agent_samples = scrape(agent)
    skill_samples, llm_samples = scrape(tiny_skill), scrape(tiny_llm)
    turns = len(answers)
    by_skill = collections.Counter(answer["active_skill"] for answer in answers)

    assert turns == CLIENTS * 2
    assert value(agent_samples, "parley:http_requests_total", method="POST", route="/", status="200") == turns
    assert {skill: value(agent_samples, "parley:turns_total", active_skill=skill) for skill in by_skill} == by_skill
    assert value(agent_samples, "parley:turns_total") == turns
    assert value(agent_samples, "parley:turn_latency_seconds_count") == turns
    assert value(agent_samples, "parley:skill_hypothesis_latency_seconds_count", skill="prompted_skill") == turns
    assert delta(skill_samples, before_skill, "parley:http_requests_total", route="/respond", status="200") == turns
    assert delta(llm_samples, before_llm, "parley:http_requests_total", route="/respond", status="200") == turns


# --- in-process ------------------------------------------------------------------------------------


def test_a_skipped_skill_is_counted_by_reason(tmp_path):
    with recording_server(lambda request: Reply(500, {"error": {"message": "boom", "field": None}})) as failing:
        pipeline = json.loads(DIST_PIPELINE.read_text())
        skill = pipeline["services"]["skills"].pop("prompted_skill")
        pipeline["services"]["skills"]["broken"] = {**skill, "connector": {"protocol": "http", "url": failing.url("/respond"), "timeout": 30}}
        (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
        settings = AgentSettings.from_env({"PIPELINE_CONFIG": str(tmp_path / "pipeline.json"),
                                           "STATE_DB_PATH": str(tmp_path / "state.sqlite3")})
        client = create_agent(settings).test_client()
        client.post("/", json={"user_id": "ann", "payload": "Hi"})
        client.post("/", json={"user_id": "ann", "payload": "Hi again"})
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)) for s in f.samples}

    assert value(samples, "parley:skills_skipped_total", skill="broken", reason="failed") == 2
    assert value(samples, "parley:turns_total", active_skill="last_chance_service") == 2
    assert value(samples, "parley:http_requests_total", method="POST", route="/", status="200") == 2


def test_routes_are_labelled_by_their_rule_not_the_raw_path(tmp_path):
    settings = AgentSettings.from_env({"STATE_DB_PATH": str(tmp_path / "state.sqlite3")})
    client = create_agent(settings).test_client()
    for dialog_id in ("one", "two", "three"):
        client.get(f"/api/dialogs/{dialog_id}")
    client.get("/no/such/route")
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)) for s in f.samples}

    assert value(samples, "parley:http_requests_total", route="/api/dialogs/<dialog_id>", status="404") == 3
    assert value(samples, "parley:http_requests_total", route="(unmatched)", status="404") == 1
    assert not any("one" in dict(labels).get("route", "") for _, labels in samples)
