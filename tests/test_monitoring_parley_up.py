"""`parley up --monitoring`: the universal_prompted_assistant with API keys (the checkout's
.env_secret, as `parley secrets init` writes it) and Prometheus from Debian's `prometheus` binary,
scraping every service with the key (tier: real processes through `parley up`, the embedded SmolLM2,
a real Prometheus; `make test` installs it with scripts/install-system-packages).

Through Prometheus' own HTTP API: every service is a target that is up (their /metrics refuse a
scrape without the key, so the key is what makes them up), and after a dialog Prometheus holds the
LLM's `parley:generation_tokens_total`, equal to what the LLM itself reports.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import requests

from parley.api_keys import first_key, write_key_file
from parley.repo import Repo
from parley.up import run_distribution
from support.servers import REPO_ROOT

pytestmark = pytest.mark.model

DIST = "universal_prompted_assistant"
LINKED = ["services", "skills", "common", "components", "docker-compose.yml", ".env", "components.tsv"]
SERVICES = {"agent", "prompted-skill", "transformers-lm-smollm2"}
TURN_TIMEOUT = 300


def write_checkout(root: Path) -> Path:
    """A checkout whose code is this one's (links), with a key of its own and a short greedy config."""
    root.mkdir(parents=True)
    for name in LINKED:
        (root / name).symlink_to(REPO_ROOT / name)
    dist = root / "assistant_dists" / DIST
    shutil.copytree(REPO_ROOT / "assistant_dists" / DIST, dist)
    greedy = dist / "greedy_generative_config.json"
    greedy.write_text(json.dumps({"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 16}))
    (dist / "test.yml").write_text(textwrap.dedent(f"""\
        services:
          agent:
            environment:
              RESPONSE_TIME_LIMIT: "{TURN_TIMEOUT}"
          prompted-skill:
            environment:
              GENERATIVE_SERVICE_CONFIG: {greedy}
              GENERATIVE_TIMEOUT: "{TURN_TIMEOUT - 30}"
        """))
    pipeline = json.loads((dist / "pipeline_conf.json").read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"]["timeout"] = TURN_TIMEOUT - 10
    (dist / "pipeline_conf.json").write_text(json.dumps(pipeline, indent=2))
    write_key_file(root)
    return root


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("monitoring")
    checkout = write_checkout(workdir / "checkout")
    with run_distribution(Repo(checkout), DIST, free_ports=True, overlays=["cpu.yml", "test.yml"], monitoring=True,
                          state_dir=workdir / "state", startup_timeout=600) as distribution:
        yield distribution, first_key(checkout)


def query(distribution, expression: str) -> list[dict]:
    answer = requests.get(distribution.url("prometheus") + "/api/v1/query", params={"query": expression}, timeout=30).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(condition, timeout_seconds: float = 120):
    deadline = time.monotonic() + timeout_seconds
    while not (found := condition()) and time.monotonic() < deadline:
        time.sleep(1)
    return found


def test_prometheus_scrapes_every_service_with_the_key_and_each_is_up(running):
    distribution, key = running

    def targets():
        return requests.get(distribution.url("prometheus") + "/api/v1/targets", timeout=30).json()["data"]["activeTargets"]

    wait_for(lambda: {t["labels"]["job"] for t in targets() if t["health"] == "up"} == SERVICES)
    targets = targets()
    unguarded = requests.get(distribution.url("agent") + "/metrics", timeout=30)

    assert {t["labels"]["job"]: t["health"] for t in targets} == {service: "up" for service in SERVICES}, targets
    assert {sample["metric"]["job"]: sample["value"][1] for sample in query(distribution, "up")} == {s: "1" for s in SERVICES}
    assert unguarded.status_code == 401  # without the key no scrape would succeed
    assert distribution.url("prometheus").startswith("http://127.0.0.1:")


def test_after_a_dialog_prometheus_holds_the_llms_generated_tokens(running):
    distribution, key = running
    headers = {"Authorization": f"Bearer {key}"}
    answer = requests.post(distribution.url("agent") + "/", headers=headers, timeout=TURN_TIMEOUT,
                           json={"user_id": "monitoring", "payload": "What is the capital of France?"})
    assert answer.status_code == 200, answer.text
    reported = next(float(line.rsplit(" ", 1)[1]) for line in
                    requests.get(distribution.url("transformers-lm-smollm2") + "/metrics", headers=headers, timeout=30).text.splitlines()
                    if line.startswith("parley:generation_tokens_total{"))

    def scraped():
        result = query(distribution, "sum(parley:generation_tokens_total)")
        return result and float(result[0]["value"][1]) == reported

    def turn_scraped():
        result = query(distribution, 'sum(parley:turns_total{active_skill="prompted_skill"})')
        return result and float(result[0]["value"][1]) >= 1

    assert reported > 0 and answer.json()["active_skill"] == "prompted_skill"
    assert wait_for(scraped), query(distribution, "sum(parley:generation_tokens_total)")
    assert wait_for(turn_scraped), query(distribution, "parley:turns_total")
