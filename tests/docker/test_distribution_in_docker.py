"""The universal_prompted_assistant distribution in real Docker, the way its users run it.

Its images build, `docker compose up -d --wait` (base, override, dev, cpu and monitoring overlays,
with the API key of the checkout's `.env_secret`) answers a dialog through the agent's published
port (and 401 without the key), the dialog survives restarting the agent (the state volume),
Prometheus (monitoring.yml) scrapes every service with the key (every target `up == 1`, and
`parley:generation_tokens_total` counts the dialog's tokens, read through Prometheus' own HTTP API),
the OpenAI-API LLM image (not in the distribution) builds and answers through the LLM container's
`/v1`, and with the proxy overlay the LLM's `/respond` goes through nginx, which checks the key. Run by `make
test-docker` as root: it starts a Docker engine with `parley engine start` when none runs, and
stops it again at the end; the stack is always taken down with `down -v`, also on failure, and the
test fails if anything of it (or the engine it started) is left. Every step prints its duration.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from support.servers import free_port

from parley.api_keys import read_keys

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIR = REPO_ROOT / "tests" / "output"
DIST = "universal_prompted_assistant"
PROJECT = "parley-test-docker"
LLM_SERVICE = "transformers-lm-smollm2"
# What dev.yml publishes on 127.0.0.1. Where one of them is taken (a shared machine), the test adds
# an overlay of its own that publishes the same services on free ports instead.
DEV_PORTS = {"agent": 4242, "prompted-skill": 8147, LLM_SERVICE: 8180}
PORTS_OVERLAY = OUTPUT_DIR / "docker-ports.yml"
# The proxy test's "remote host" that runs the LLM: a container of the real LLM image, kept under
# its own tag because building the proxy overlay gives the LLM service's image name to nginx.
UPSTREAM_LLM = f"{PROJECT}-upstream-llm"
OPENAI_API_LM = f"{PROJECT}-openai-api-lm"  # image and container
ENV_FILE = REPO_ROOT / ".cache" / "parley-engine.env"
# The overlays the stack runs with; monitoring.yml adds Prometheus.
OVERLAYS = ("dev.yml", "cpu.yml", "monitoring.yml")


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Print a step as it starts and its duration as it ends, also when it fails."""
    print(f"\n==> {title}", flush=True)
    started = time.monotonic()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        print(f"    {outcome} in {time.monotonic() - started:.1f}s: {title}", flush=True)


def run(command: list[str], env: dict[str, str], log_name: str | None = None, timeout: float = 1800) -> str:
    """Run a command from the repository root; keep its output in tests/output/<log_name>, show
    the lines that matter as they come, and fail with the output's tail."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    log_path = OUTPUT_DIR / (log_name or "docker-commands.log")
    lines: list[str] = []
    with open(log_path, "a") as log, subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:  # closes the pipe when done (pytest's filterwarnings=error fails an unclosed one)
        log.write(f"\n$ {' '.join(command)}\n")
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in process.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            if log_name and _worth_showing(line):
                print("    " + line.rstrip(), flush=True)
            if time.monotonic() > deadline:
                process.kill()
        code = process.wait()
    if code != 0:
        tail = "\n".join(lines[-60:])
        pytest.fail(f"`{' '.join(command)}` exited with {code} (full log: {log_path}):\n{tail}", pytrace=False)
    return "\n".join(lines)


def _worth_showing(line: str) -> bool:
    """From BuildKit's plain progress, the steps that run and the images named, not every pip line."""
    text = line.strip()
    return (
        text.startswith("#") and (" [" in text and ("RUN" in text or "FROM" in text) or "naming to" in text)
        or text.endswith((" Built", " Healthy", " Started", " Running", " Removed"))
        or "ERROR" in text
    )


def compose(*overlays: str) -> list[str]:
    files = ["docker-compose.yml", f"assistant_dists/{DIST}/docker-compose.override.yml"]
    files += [f"assistant_dists/{DIST}/{overlay}" for overlay in overlays]
    if PORTS_OVERLAY.is_file():
        files.append(str(PORTS_OVERLAY))
    return ["docker", "compose", "--project-name", PROJECT, *(arg for file in files for arg in ("-f", file))]


def engine_environment() -> dict[str, str]:
    """This process's environment plus what `parley engine start` wrote for compose (BASE_IMAGE)."""
    environment = dict(os.environ)
    if ENV_FILE.is_file():
        for line in ENV_FILE.read_text().splitlines():
            key, separator, value = line.partition("=")
            if separator and not key.startswith("#"):
                environment[key.strip()] = value.strip()
    return environment


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def ports_taken(ports: tuple[int, ...]) -> list[int]:
    """The ports among these that Docker could not publish on 127.0.0.1 now: something listens on
    them, or holds them bound without listening (which a connect does not see, but a bind does)."""
    taken = []
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Docker's proxy binds
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken.append(port)
    return taken


def publish_on_free_ports_where_taken() -> None:
    """Keep dev.yml's ports when they are free; else write an overlay that publishes on free ones."""
    PORTS_OVERLAY.unlink(missing_ok=True)
    taken = ports_taken(tuple(DEV_PORTS.values()))
    if not taken:
        return
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by tests/docker: dev.yml's ports are taken on this machine, so these are used.", "services:"]
    for service, port in DEV_PORTS.items():
        free = free_port()
        lines += [f"  {service}:", "    ports: !override", f'      - "127.0.0.1:{free}:{port}"']
        DEV_PORTS[service] = free
    PORTS_OVERLAY.write_text("\n".join(lines) + "\n")
    print(f"    ports {taken} are taken here: publishing on {DEV_PORTS} instead ({PORTS_OVERLAY})")
    holders = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout.splitlines()
    print("\n".join(f"    {line}" for line in holders if any(f":{port} " in line for port in taken)))


def agent_url(path: str) -> str:
    return f"http://127.0.0.1:{DEV_PORTS['agent']}{path}"


def wait_until_healthy(url: str, timeout_seconds: float = 120) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=3).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_seconds}s")


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    """A Docker engine: the one running, or one that `parley engine` starts now and stops after."""
    if os.geteuid() != 0:
        pytest.fail("make test-docker needs root (it may start dockerd): run it as root or with sudo", pytrace=False)
    parley = str(Path(sys.executable).parent / "parley")
    started_here = not docker_answers()
    try:  # a start that fails half-way is stopped too
        with step("docker engine (parley engine start)"):
            run([parley, "engine", "start"], dict(os.environ), log_name="docker-engine.log", timeout=1500)
            print((OUTPUT_DIR / "docker-engine.log").read_text().rsplit("$ ", 1)[-1], flush=True)
        yield engine_environment()
    finally:
        if started_here:
            with step("stop the engine this test started (parley engine stop)"):
                subprocess.run([parley, "engine", "stop"], check=False)
                daemon_left, bridge_left = docker_answers(), Path("/sys/class/net/docker0").exists()
                print(f"    daemon answering: {daemon_left}; docker0: {bridge_left}")
    if started_here:
        assert not daemon_left and not bridge_left, "the engine this test started was left running"


@pytest.fixture(scope="module")
def api_key() -> Iterator[str]:
    """The checkout's key (.env_secret, which every service reads): the one there, or one that
    `parley secrets init` writes now and that is removed after."""
    secret = REPO_ROOT / ".env_secret"
    written_here = not secret.exists()
    if written_here:
        run([str(Path(sys.executable).parent / "parley"), "secrets", "init"], dict(os.environ))
    try:
        yield read_keys(REPO_ROOT)[0]
    finally:
        if written_here:
            secret.unlink(missing_ok=True)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(engine: dict[str, str], api_key: str) -> Iterator[dict[str, str]]:
    """The distribution built and up with the base, override, dev, cpu and monitoring overlays and
    the checkout's key; always taken down."""
    environment = engine
    (OUTPUT_DIR / "docker-build.log").unlink(missing_ok=True)
    try:
        with step(f"build the {DIST} images (base + override + {' + '.join(OVERLAYS)})"):
            run([*compose(*OVERLAYS), "--progress", "plain", "build"], environment, "docker-build.log")
            run(["docker", "tag", f"{PROJECT}-{LLM_SERVICE}", UPSTREAM_LLM], environment)
            print(run(["docker", "image", "ls", "--format", "    {{.Repository}}:{{.Tag}}  {{.Size}}", f"{PROJECT}-*"], environment))
        running = subprocess.run(["docker", "ps", "--format", "{{.Names}} {{.Ports}}"], env=environment, capture_output=True, text=True).stdout.split("\n")
        if any(running):
            print("    already running on this engine:\n" + "\n".join(f"      {line}" for line in running if line))
        publish_on_free_ports_where_taken()  # just before `up`: what the engine restarted has bound by now
        with step(f"docker compose up -d --wait (base + override + {' + '.join(OVERLAYS)})"):
            run([*compose(*OVERLAYS), "up", "-d", "--wait", "--wait-timeout", "300"], environment, "docker-up.log")
        yield environment
    finally:
        with step("docker compose down -v (and the proxy test's upstream container)"):
            with open(OUTPUT_DIR / "docker-compose-services.log", "w") as log:
                subprocess.run([*compose(*OVERLAYS), "logs", "--no-color"], cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
            subprocess.run(["docker", "rm", "-f", UPSTREAM_LLM], capture_output=True)
            subprocess.run(["docker", "image", "rm", UPSTREAM_LLM], capture_output=True)
            subprocess.run([*compose(*OVERLAYS, "proxy.yml"), "down", "-v", "--remove-orphans"], cwd=REPO_ROOT, env=environment, check=False)
            PORTS_OVERLAY.unlink(missing_ok=True)
            print(f"    service logs: {OUTPUT_DIR / 'docker-compose-services.log'}")
            leftovers = project_leftovers(environment)
            print(f"    left of {PROJECT}: {leftovers or 'nothing'}")
    assert leftovers == [], "docker compose down -v left these behind"


def project_leftovers(environment: dict[str, str], project: str = PROJECT) -> list[str]:
    """The compose project's containers, volumes and networks that still exist."""
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind, listing in (("container", ["ps", "-a"]), ("volume", ["volume", "ls"]), ("network", ["network", "ls"])):
        names = subprocess.run(
            ["docker", *listing, "--filter", label, "--format", "{{.Name}}" if kind != "container" else "{{.Names}}"],
            env=environment, capture_output=True, text=True,
        ).stdout.split()
        found += [f"{kind} {name}" for name in names]
    return found


@pytest.fixture(scope="module")
def first_turn(stack: dict[str, str], api_key: str) -> dict:
    with step(f"turn 1 through the agent's published port ({agent_url('/')})"):
        response = requests.post(
            agent_url("/"), json={"user_id": "docker-test", "payload": "What is the capital of France?"},
            headers=auth(api_key), timeout=180,
        )
        response.raise_for_status()
        body = response.json()
        print(f"    agent answered: {body['response']!r} (skill {body.get('active_skill')})")
    return body


def dialog_texts(dialog_id: str, api_key: str) -> list[str]:
    response = requests.get(agent_url(f"/api/dialogs/{dialog_id}"), headers=auth(api_key), timeout=30)
    response.raise_for_status()
    return [utterance["text"] for utterance in response.json()["utterances"]]


def prometheus_query(environment: dict[str, str], query: str) -> list[dict]:
    """Prometheus' own HTTP API (`/api/v1/query`), asked inside its container (its port is not published)."""
    probe = ("import json, sys, urllib.parse, urllib.request; "
             "url = 'http://127.0.0.1:9090/api/v1/query?query=' + urllib.parse.quote(sys.argv[1]); "
             "print(json.dumps(json.load(urllib.request.urlopen(url, timeout=10))))")
    output = run([*compose(*OVERLAYS), "exec", "-T", "prometheus", "python3", "-c", probe, query], environment)
    answer = json.loads(output.strip().splitlines()[-1])
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_starting_the_engine_again_reuses_what_is_there(engine):
    parley = str(Path(sys.executable).parent / "parley")
    with step("parley engine start, again"):
        output = run([parley, "engine", "start"], dict(os.environ))
        print("\n".join("    " + line for line in output.splitlines() if "already" in line or "reusing" in line))

    assert "already installed: docker.io, debootstrap" in output
    assert "already linked:" in output
    assert "already running (ours, pid" in output or "already running (not started by parley engine)" in output
    assert "no registry reachable; reusing the local base image" in output or "BASE_IMAGE" not in engine


def test_the_agent_answers_the_capital_of_france_with_paris_through_the_containers(first_turn):
    assert "Paris" in first_turn["response"]


def test_without_the_key_the_agent_answers_401_and_its_health_stays_public(stack):
    refused = requests.post(agent_url("/"), json={"user_id": "docker-test", "payload": "Hi"}, timeout=30)
    wrong = requests.get(agent_url("/metrics"), headers=auth("not-the-key-0123456789"), timeout=30)
    health = requests.get(agent_url("/health"), timeout=30)

    assert refused.status_code == 401 and refused.json()["error"]["field"] == "Authorization"
    assert wrong.status_code == 401
    assert health.status_code == 200


def test_a_second_turn_is_stored_in_the_same_dialog(first_turn, api_key):
    with step("turn 2 in the same dialog"):
        second = requests.post(
            agent_url("/"), json={"user_id": "docker-test", "payload": "And of Italy?"}, headers=auth(api_key), timeout=180
        ).json()

    assert second["dialog_id"] == first_turn["dialog_id"]
    assert dialog_texts(first_turn["dialog_id"], api_key) == [
        "What is the capital of France?", first_turn["response"], "And of Italy?", second["response"]
    ]


def test_prometheus_scrapes_every_service_with_the_key_and_counts_the_dialogs_tokens(stack, first_turn):
    services = {"agent", "prompted-skill", LLM_SERVICE}
    with step("Prometheus' HTTP API: every target up, and the LLM's generated tokens (scraped every 5s)"):
        deadline = time.monotonic() + 120
        while True:
            up = {sample["metric"]["job"]: sample["value"][1] for sample in prometheus_query(stack, "up")}
            tokens = prometheus_query(stack, "sum(parley:generation_tokens_total)")
            generated = float(tokens[0]["value"][1]) if tokens else 0.0
            if (set(up) >= services and all(value == "1" for value in up.values()) and generated > 0) \
                    or time.monotonic() > deadline:
                break
            time.sleep(2)
        print(f"    up: {up}; parley:generation_tokens_total: {generated:g}")
        turns = prometheus_query(stack, "sum(parley:turns_total)")

    assert set(up) == services
    assert all(value == "1" for value in up.values()), up
    assert generated > 0
    assert turns and float(turns[0]["value"][1]) >= 1


def test_the_dialog_is_still_readable_after_restarting_the_agent(stack, first_turn, api_key):
    before = dialog_texts(first_turn["dialog_id"], api_key)

    with step("docker compose restart agent"):
        run([*compose(*OVERLAYS), "restart", "agent"], stack, "docker-up.log")
        wait_until_healthy(agent_url("/health"))

    assert dialog_texts(first_turn["dialog_id"], api_key) == before


def test_the_openai_api_llm_image_builds_and_answers_through_the_llm_containers_v1(stack, api_key):
    # Not part of the distribution, so compose does not build it: its Dockerfile is proven here.
    port = free_port()
    try:
        with step("build services/openai_api_lm/Dockerfile (with compose's BuildKit: the engine has no buildx)"):
            build_file = OUTPUT_DIR / "docker-openai-api-lm.yml"
            build_file.write_text(json.dumps({"services": {"openai-api-lm": {
                "image": OPENAI_API_LM,
                "build": {"context": str(REPO_ROOT), "dockerfile": "services/openai_api_lm/Dockerfile",
                          "args": {"BASE_IMAGE": stack.get("BASE_IMAGE", "python:3.11-slim")}},
            }}}))
            run(["docker", "compose", "-p", OPENAI_API_LM, "-f", str(build_file), "--progress", "plain", "build"],
                stack, "docker-build.log")
        with step(f"run it on the stack's network, forwarding to http://{LLM_SERVICE}:8180/v1"):
            # The upstream is this distribution's LLM, by the name it serves (its card's); its key is the distribution's (as OPENAI_API_KEY).
            run(["docker", "run", "-d", "--init", "--name", OPENAI_API_LM, "--network", f"{PROJECT}_default",
                 "--env", f"OPENAI_BASE_URL=http://{LLM_SERVICE}:8180/v1",
                 "--env", f"PRETRAINED_MODEL_NAME_OR_PATH={LLM_SERVICE}",
                 "--env", f"OPENAI_API_KEY={api_key}", "--env", f"PARLEY_API_KEYS={api_key}",
                 "--publish", f"127.0.0.1:{port}:8181", OPENAI_API_LM], stack)
            wait_until_healthy(f"http://127.0.0.1:{port}/health")
        with step(f"POST /respond on 127.0.0.1:{port} (openai-api-lm -> {LLM_SERVICE}/v1)"):
            response = requests.post(
                f"http://127.0.0.1:{port}/respond",
                json={"dialog_contexts": [["What is the capital of France?"]], "configs": [{"max_tokens": 24, "temperature": 0}]},
                headers=auth(api_key), timeout=180,
            )
            print(f"    {response.status_code}: {response.text[:200]}")
    finally:
        subprocess.run(["docker", "rm", "-f", OPENAI_API_LM], capture_output=True)
        subprocess.run(["docker", "image", "rm", OPENAI_API_LM], capture_output=True)

    assert response.status_code == 200
    assert "Paris" in response.text


def test_with_the_proxy_overlay_the_llm_answers_respond_through_nginx_which_checks_the_key(stack, api_key):
    environment = {**stack, "PARLEY_PROXY_HOST": "llm-upstream"}
    with step("an LLM on another 'host' (a container on the stack's network, alias llm-upstream)"):
        run(
            ["docker", "run", "-d", "--init", "--name", UPSTREAM_LLM, "--network", f"{PROJECT}_default",
             "--network-alias", "llm-upstream", "--env", "DEVICE=cpu", "--env", f"PARLEY_API_KEYS={api_key}", UPSTREAM_LLM],
            environment,
        )
    with step("build and up -d --wait with the proxy overlay: the LLM service becomes nginx"):
        proxied = compose(*OVERLAYS, "proxy.yml")
        run([*proxied, "--progress", "plain", "build", LLM_SERVICE], environment, "docker-build.log")
        run([*proxied, "up", "-d", "--wait", "--wait-timeout", "300"], environment, "docker-up.log")

    with step(f"POST /respond on 127.0.0.1:{DEV_PORTS[LLM_SERVICE]} (nginx -> llm-upstream:8180)"):
        proxy_url = f"http://127.0.0.1:{DEV_PORTS[LLM_SERVICE]}"
        refused = requests.post(proxy_url + "/respond", json={"dialog_contexts": [["Hi"]]}, timeout=30)
        refused_v1 = requests.get(proxy_url + "/v1/models", headers=auth("not-the-key-0123456789"), timeout=30)
        health = requests.get(proxy_url + "/health", timeout=30)
        print(f"    without the key: {refused.status_code} from {refused.headers.get('Server')}: {refused.text[:160]}")
        response = requests.post(
            proxy_url + "/respond",
            headers=auth(api_key),
            json={
                "dialog_contexts": [["What is the capital of France?"]],
                # the distribution's prompt, as the prompted skill sends it, and one greedy answer
                "prompts": [json.loads((REPO_ROOT / "common/prompts/universal_prompted_assistant.json").read_text())["prompt"]],
                "configs": [{"max_new_tokens": 24, "do_sample": False, "num_return_sequences": 1}],
            },
            timeout=180,
        )
        print(f"    {response.status_code} from {response.headers.get('Server')}: {response.text[:200]}")

    assert refused.status_code == 401 and refused.headers["Server"].startswith("nginx")
    assert refused.json()["error"]["field"] == "Authorization"  # Dream's shape
    assert refused_v1.status_code == 401 and refused_v1.json()["error"]["type"] == "authentication_error"  # OpenAI's
    assert health.status_code == 200
    assert response.status_code == 200
    assert response.headers["Server"].startswith("nginx")
    assert "Paris" in response.text
