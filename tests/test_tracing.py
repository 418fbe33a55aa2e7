"""One trace id per turn, from the agent through the skill to the LLM (tier: real gunicorn processes on
loopback, the LLM on the tiny model; W3C header parsing in-process at the end).

A turn sent without `traceparent` gets a trace id made by the agent, returned in `X-Trace-Id`;
the agent's, the skill's and the LLM's log lines of that turn all carry it. A caller's own
`traceparent` is continued. LOG_FORMAT=json makes every line a JSON object with the trace id;
with OTEL_EXPORTER_OTLP_ENDPOINT each request is a span exported over OTLP/HTTP, in the same trace.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
import requests

from common.tracing import parse_traceparent
from support.recording_server import Reply, recording_server
from support.servers import service_server
from support.tiny_stack import agent_service

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def agent(tmp_path_factory, tiny_skill):
    folder = tmp_path_factory.mktemp("tracing")
    with agent_service(folder, tiny_skill, folder / "state.sqlite3") as server:
        yield server


def lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def test_one_trace_id_made_by_the_agent_is_in_the_agents_the_skills_and_the_llms_lines_of_the_turn(agent, tiny_skill, tiny_llm):
    user = f"trace-{uuid.uuid4().hex[:8]}"
    answer = requests.post(agent.url("/"), json={"user_id": user, "payload": "Hello there"}, timeout=120)
    trace_id = answer.headers["X-Trace-Id"]
    logs = {"agent": agent.log_through_now(), "skill": tiny_skill.log_through_now(), "llm": tiny_llm.log_through_now()}

    assert answer.status_code == 200 and TRACE_ID.match(trace_id)
    assert answer.headers["traceparent"].startswith(f"00-{trace_id}-")
    turn_line = lines_with(logs["agent"], f"turn of user {user} ")
    assert len(turn_line) == 1 and trace_id in turn_line[0]
    assert all(trace_id in line for line in lines_with(logs["agent"], user))  # every line of the turn has it
    assert any("asking" in line for line in lines_with(logs["skill"], trace_id))  # the skill's call to the LLM
    assert any('"POST /respond' in line for line in lines_with(logs["skill"], trace_id))  # its access line
    assert any('"POST /respond' in line for line in lines_with(logs["llm"], trace_id))  # the LLM served it in the same trace
    assert not any(trace_id in line for line in lines_with(logs["llm"], "/health?log-mark"))  # another request, another id


def test_a_callers_traceparent_is_continued_to_the_llm(agent, tiny_llm):
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    answer = requests.post(agent.url("/"), headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                           json={"user_id": "trace-caller", "payload": "Hi"}, timeout=120)

    assert answer.headers["X-Trace-Id"] == trace_id
    assert answer.headers["traceparent"].split("-")[2] != parent  # the agent's own span, in the caller's trace
    assert any('"POST /respond' in line for line in lines_with(tiny_llm.log_through_now(), trace_id))


def test_an_invalid_traceparent_starts_a_new_trace_instead_of_failing(agent):
    answer = requests.get(agent.url("/health"), headers={"traceparent": "00-not-a-trace-01"}, timeout=30)

    assert answer.status_code == 200
    assert TRACE_ID.match(answer.headers["X-Trace-Id"])


def test_with_log_format_json_every_line_is_a_json_object_carrying_its_requests_trace_id():
    with service_server("prompted_skill", {"LOG_FORMAT": "json", "SERVICE_HOST": "127.0.0.1"}) as skill:
        answer = requests.post(skill.url("/respond"), json={"dialogs": []}, timeout=30)
        log = skill.log_through_now()
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]

    assert answer.status_code == 400
    assert entries and all({"time", "level", "logger", "message", "trace_id"} <= set(entry) for entry in entries)
    access = [entry for entry in entries if entry["logger"] == "gunicorn.access" and "POST /respond" in entry["message"]]
    assert len(access) == 1 and access[0]["trace_id"] == answer.headers["X-Trace-Id"]


def test_with_an_otlp_endpoint_each_request_is_a_span_exported_in_the_callers_trace():
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with recording_server(lambda request: Reply(200, {})) as collector:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.base_url, "OTEL_BSP_SCHEDULE_DELAY": "100",
               "SERVICE_HOST": "127.0.0.1", "SERVICE_NAME": "prompted_skill"}
        with service_server("prompted_skill", env) as skill:
            answer = requests.get(skill.url("/ping"), headers={"traceparent": f"00-{trace_id}-{parent}-01"}, timeout=30)
            deadline = time.monotonic() + 30
            while not any(r.path == "/v1/traces" for r in collector.requests) and time.monotonic() < deadline:
                time.sleep(0.1)
            log = skill.log_through_now()
    spans = []
    for request in (r for r in collector.requests if r.path == "/v1/traces"):
        export = ExportTraceServiceRequest.FromString(request.body)
        spans += [span for resource in export.resource_spans for scope in resource.scope_spans for span in scope.spans]
    ping = [span for span in spans if span.name == "GET /ping"]

    assert "exporting a span per request" in log
    assert len(ping) == 1
    assert ping[0].trace_id.hex() == trace_id and ping[0].parent_span_id.hex() == parent
    assert ping[0].span_id.hex() == answer.headers["traceparent"].split("-")[2]  # the span the logs and callees see


@pytest.mark.parametrize("header, valid", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00", True),  # case does not matter
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # an all-zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # an all-zero parent
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),  # version ff is invalid
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),  # version 00 has no more fields
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),  # a later version may
    ("", False),
])
def test_traceparent_headers_are_read_as_w3c_trace_context_says(header, valid):
    assert (parse_traceparent(header) is not None) is valid
