"""Schema fuzzing: schemathesis generates requests from each service's /openapi.json and checks the
answers against it — no 5xx, every response (4xx included) in its documented shape and status.

Real gunicorn servers on loopback, the LLM service on the tiny model the tests build, so each case
takes milliseconds. Every operation gets valid (positive) and invalid (negative) requests; seeded,
so a failure reproduces. The case counts per service go to tests/output/fuzz-cases.json.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from support.servers import REPO_ROOT, service_server
from support.tiny_stack import agent_service, tiny_generative_config

MIN_CASES_PER_SERVICE = 500
SEED = 20261125
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Requests with a body carry most of the input space; operations without inputs need one case.
BODY_CASES = {GenerationMode.POSITIVE: 0.6, GenerationMode.NEGATIVE: 0.4}
PATH_PARAMETER_CASES = 40
OUTPUT = REPO_ROOT / "tests" / "output" / "fuzz-cases.json"


def fuzz_service(base_url: str, cases_for_body_operations: int) -> tuple[Counter, list[str]]:
    """Run every operation of the service's schema; the case count per operation and the failures."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    body_operations = [op for op in operations if op.body]
    per_body_operation = math.ceil(cases_for_body_operations / max(1, len(body_operations)))
    session = requests.Session()
    counts: Counter = Counter()
    failures: list[str] = []
    for operation in operations:
        if operation in body_operations:
            modes = {mode: round(per_body_operation * share) for mode, share in BODY_CASES.items()}
        else:  # a path parameter is any string: there is no invalid one to generate
            modes = {GenerationMode.POSITIVE: PATH_PARAMETER_CASES if operation.path_parameters else 1}
        for mode, max_examples in modes.items():
            checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

            @seed(SEED)
            @settings(max_examples=max_examples, deadline=None, database=None,
                      phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck),
                      print_blob=True)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                counts[operation.label] += 1
                case.call_and_validate(base_url=base_url, session=session, checks=checks)

            try:
                run()
            except (Exception, BaseExceptionGroup) as failure:  # noqa: BLE001 - every operation is fuzzed; all reported
                failures.append(f"{operation.label} ({mode.value}): {failure}")
    return counts, failures


def record(service: str, counts: Counter) -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    known[service] = {"total": sum(counts.values()), "per_operation": dict(counts)}
    OUTPUT.write_text(json.dumps(known, indent=2))


def assert_fuzzed(service: str, counts: Counter, failures: list[str]) -> None:
    record(service, counts)
    print(f"{service}: {sum(counts.values())} cases", dict(counts))
    assert not failures, "\n\n".join(failures)
    assert sum(counts.values()) >= MIN_CASES_PER_SERVICE, counts


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llm, tiny_skill):
    folder = tmp_path_factory.mktemp("fuzz")
    with agent_service(folder, tiny_skill, folder / "state.sqlite3") as agent:
        yield {"llm": tiny_llm, "skill": tiny_skill, "agent": agent, "folder": folder}


def test_llm_service_answers_every_generated_request_as_documented(stack):
    counts, failures = fuzz_service(stack["llm"].base_url, 560)
    assert_fuzzed("transformers_lm", counts, failures)


def test_prompted_skill_answers_every_generated_request_as_documented(stack):
    counts, failures = fuzz_service(stack["skill"].base_url, 520)
    assert_fuzzed("prompted_skill", counts, failures)


def test_agent_answers_every_generated_request_as_documented(stack):
    counts, failures = fuzz_service(stack["agent"].base_url, 440)  # + 2 x 40 dialog and user ids
    assert_fuzzed("agent", counts, failures)


def test_openai_api_lm_answers_every_generated_request_as_documented(stack):
    # Its upstream is the tiny LLM service's own OpenAI API: a real OpenAI-compatible server.
    llm = stack["llm"]
    model = requests.get(llm.url("/v1/models"), timeout=10).json()["data"][0]["id"]
    env = {"SERVICE_NAME": "openai-api-tiny", "OPENAI_BASE_URL": llm.url("/v1"),
           "PRETRAINED_MODEL_NAME_OR_PATH": model, "GENERATIVE_TIMEOUT": "20",
           "GENERATIVE_CONFIG": str(tiny_generative_config(stack["folder"])),
           "MAX_NEW_TOKENS_CAP": "24", "MAX_NUM_RETURN_SEQUENCES": "3"}
    with service_server("openai_api_lm", env) as service:
        counts, failures = fuzz_service(service.base_url, 520)
    assert_fuzzed("openai_api_lm", counts, failures)
