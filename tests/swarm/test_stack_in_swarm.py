"""The universal_prompted_assistant distribution as a Docker Swarm stack, on a real single-node swarm.

The steps are the README's "Beyond one machine": build the images (make test-docker's, reused from
its build cache, and the autoscaler's), `parley stack --endpoint-mode dnsrr` (this kernel has no
IPVS; the LLM's card autoscales, so the stack has the autoscaler), `docker swarm init`, label the
node that keeps the agent's state, `docker secret create parley_api_keys` from the checkout's key
(.env_secret), `docker stack deploy`, and at least 2 LLM replicas through the autoscaler's
`min_replicas` label. Then: the key reaches the services only as that secret (not in the stack
file, not in any container's environment) and a turn without it is refused; a dialog through the
agent answers Paris; turns reach both LLM replicas; killing one replica's container while 4 dialogs
run loses no turn and the replica is replaced; `docker service update --env-add` rolls the LLM
over, start-first, while dialogs go on; and the autoscaler, given short delays, takes the LLM from 1
replica to 2 under 4 users' load and back to 1 when 3 of them stop, every decision logged with its
reason, no turn failing throughout (a replica scaled away drains). `docker stack rm` and `docker
swarm leave --force` always run at the end, also on failure, and the test checks that nothing of the
stack is left. Run by `make test-swarm` as root, on the engine of `make test-docker` (its `engine`
fixture: started by `parley engine start` when none runs, stopped after). Every step prints its
duration.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]


def _docker_test_module():
    """make test-docker's module: its engine fixture, its step/run helpers and its image names."""
    path = REPO_ROOT / "tests" / "docker" / "test_distribution_in_docker.py"
    spec = importlib.util.spec_from_file_location("parley_docker_tests", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


docker_tests = _docker_test_module()
engine = docker_tests.engine  # the fixtures: pytest finds them by name in this module
api_key = docker_tests.api_key
step, run, compose = docker_tests.step, docker_tests.run, docker_tests.compose

DIST = docker_tests.DIST
# make test-docker's compose project: the stack runs the images it built (PROJECT-SERVICE).
IMAGES_PROJECT = docker_tests.PROJECT
STACK = "parley-test-swarm"
LLM_SERVICE = "transformers-lm-smollm2"
LLM = f"{STACK}_{LLM_SERVICE}"
AUTOSCALER = f"{STACK}_autoscaler"
AGENT_URL = "http://127.0.0.1:4242"
SKILL = "prompted_skill"
OUTPUT_DIR = REPO_ROOT / "tests" / "output"
STACK_FILE = OUTPUT_DIR / "swarm-stack.yml"
QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "Name a colour.", "Say hello."]
# Users who talk at once to grow the LLM: with the one who goes on throughout, 4 turns in progress,
# twice the card's target_ongoing_requests (2) for one replica.
BURST_USERS = 3
# The agent's key, as every request sends it (set by the swarm_stack fixture).
HEADERS: dict[str, str] = {}


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        pytest.fail(f"`docker {' '.join(args)}` exited with {completed.returncode}:\n{completed.stdout}{completed.stderr}", pytrace=False)
    return completed.stdout.strip()


def llm_containers() -> list[str]:
    """The running containers of the LLM service's tasks."""
    return docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={LLM}").split()


def stack_leftovers() -> list[str]:
    """Whatever of the stack still exists: containers, networks, volumes."""
    label = f"label=com.docker.stack.namespace={STACK}"
    found = docker("ps", "-aq", "--filter", label, check=False).split()
    found += docker("network", "ls", "-q", "--filter", label, check=False).split()
    found += docker("volume", "ls", "-q", "--filter", label, check=False).split()
    return found


def wait_for(what: str, condition, timeout_seconds: float) -> float:
    """Poll `condition` until it is true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(1)
    pytest.fail(f"{what}: not after {timeout_seconds:.0f}s", pytrace=False)


def agent_healthy() -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(AGENT_URL + "/health", timeout=3).status_code == 200
    return False


def turn(user_id: str, text: str) -> dict:
    response = requests.post(AGENT_URL + "/", json={"user_id": user_id, "payload": text}, headers=HEADERS, timeout=180)
    response.raise_for_status()
    return response.json()


def dialogs_in_parallel(prefix: str, turns_each: int = 2, during=None, spans: list | None = None) -> list[dict]:
    """4 users talk at once, `turns_each` turns each; `during()` runs once they have started.
    `spans`, when given, receives each turn's (start, end) in time.monotonic()."""
    def timed_turn(user_id: str, text: str) -> dict:
        started = time.monotonic()
        answer = turn(user_id, text)
        if spans is not None:
            spans.append((started, time.monotonic()))
        return answer

    def talk(index: int) -> list[dict]:
        return [timed_turn(f"{prefix}-{index}", QUESTIONS[(index + n) % len(QUESTIONS)]) for n in range(turns_each)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(talk, index) for index in range(4)]
        if during is not None:
            during()
        return [answer for future in futures for answer in future.result()]


def respond_requests_per_container() -> dict[str, int]:
    """How many POST /respond each running LLM replica has served (from its gunicorn access log)."""
    counts = {}
    for container in llm_containers():
        logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True).stdout
        counts[container] = sum(1 for line in logs.splitlines() if '"POST /respond' in line)
    return counts


def skill_log_lines(containing: str) -> list[str]:
    """The prompted skill's log lines that contain `containing` (its retries, its LLM failures)."""
    logs = subprocess.run(
        ["docker", "service", "logs", "--raw", f"{STACK}_prompted-skill"], capture_output=True, text=True, timeout=60
    )
    return [line for line in (logs.stdout + logs.stderr).splitlines() if containing in line]


def running_tasks(service: str) -> int:
    states = docker("service", "ps", service, "--filter", "desired-state=running", "--format", "{{.CurrentState}}", check=False)
    return sum(1 for state in states.splitlines() if state.startswith("Running"))


def running_llm_tasks() -> int:
    return running_tasks(LLM)


def llm_replicas_asked() -> int:
    """The replicas the LLM service asks for (what the autoscaler sets)."""
    return int(docker("service", "inspect", "--format", "{{.Spec.Mode.Replicated.Replicas}}", LLM))


def autoscaler_log_lines() -> list[str]:
    """The autoscaler's decisions, as it logged them (its logger is named `autoscaler`; a text log
    line is `date time LEVEL logger [trace id]: message`)."""
    logs = subprocess.run(["docker", "service", "logs", "--raw", AUTOSCALER], capture_output=True, text=True, timeout=60)
    return [line for line in (logs.stdout + logs.stderr).splitlines() if line.split()[3:4] == ["autoscaler"]]


@pytest.fixture(scope="module")
def swarm_stack(engine: dict[str, str], api_key: str) -> Iterator[dict[str, str]]:
    """The stack deployed on a single-node swarm, with 2 LLM replicas and the checkout's key as the
    Docker secret parley_api_keys; always removed, swarm left (which drops the secret too)."""
    environment = engine
    HEADERS["Authorization"] = f"Bearer {api_key}"
    parley = str(Path(sys.executable).parent / "parley")
    if docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "inactive":
        pytest.fail("this engine is already part of a swarm: the test makes and leaves its own", pytrace=False)
    had_gateway_bridge = bool(docker("network", "ls", "-q", "--filter", "name=^docker_gwbridge$"))
    with step("build the images (make test-docker's, from its build cache, and the autoscaler's)"):
        run([*compose("cpu.yml", "autoscaler.yml"), "--progress", "plain", "build"], environment, "swarm-build.log")
    with step(f"parley stack {DIST} --overlay cpu.yml --endpoint-mode dnsrr"):
        run([parley, "stack", DIST, "--overlay", "cpu.yml", "--endpoint-mode", "dnsrr",
             "--project", IMAGES_PROJECT, "-o", str(STACK_FILE)], environment)
        print(f"    {STACK_FILE}")
    try:
        with step("docker swarm init --advertise-addr 127.0.0.1"):
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
            docker("node", "update", "--label-add", "parley-state=true", docker("info", "--format", "{{.Swarm.NodeID}}"))
        with step("docker secret create parley_api_keys (parley secrets show | ...)"):
            key = subprocess.run([parley, "secrets", "show"], capture_output=True, text=True, check=True).stdout.strip()
            created = subprocess.run(["docker", "secret", "create", "parley_api_keys", "-"], input=key, capture_output=True, text=True)
            assert created.returncode == 0, created.stderr
        with step(f"docker stack deploy {STACK}, then at least 2 LLM replicas (the autoscaler's min_replicas label)"):
            docker("stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), STACK, timeout=300)
            wait_for("the autoscaler running", lambda: running_tasks(AUTOSCALER) == 1, 300)
            docker("service", "update", "--detach", "--label-add", "parley.autoscaling.min_replicas=2", LLM)
            waited = wait_for("2 LLM replicas running", lambda: running_llm_tasks() == 2, 600)
            print(f"    2 LLM replicas running after {waited:.1f}s")
            for line in autoscaler_log_lines():
                print(f"    {line}")
            wait_for("the agent's /health on 127.0.0.1:4242", agent_healthy, 300)
            print(docker("service", "ls", "--format", "    {{.Name}} {{.Replicas}} {{.Image}}"))
        yield environment
    finally:
        with step(f"docker stack rm {STACK}; docker swarm leave --force"):
            with open(OUTPUT_DIR / "swarm-services.log", "w") as log:
                for service in docker("stack", "services", "-q", STACK, check=False).split():
                    subprocess.run(["docker", "service", "logs", "--raw", service], stdout=log, stderr=subprocess.STDOUT)
            docker("stack", "rm", STACK, check=False)
            with contextlib.suppress(BaseException):
                wait_for("the stack's containers gone", lambda: not docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}", check=False), 120)
            docker("swarm", "leave", "--force", check=False)
            if not had_gateway_bridge:  # swarm init made it; nothing else uses it once the swarm is gone
                docker("network", "rm", "docker_gwbridge", check=False)
            for volume in docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}", check=False).split():
                docker("volume", "rm", volume, check=False)
            print(f"    service logs: {OUTPUT_DIR / 'swarm-services.log'}")
            leftovers, swarm_state = stack_leftovers(), docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False)
            print(f"    left: {leftovers or 'nothing'}; swarm: {swarm_state}")
    assert leftovers == [] and swarm_state == "inactive", "the stack or the swarm was left behind"


def test_the_key_is_a_secret_of_the_swarm_never_plain_environment_and_a_turn_without_it_is_refused(swarm_stack, api_key):
    with step("the stack file and every container's environment, for the key"):
        environments = [docker("inspect", "--format", "{{json .Config.Env}}", container)
                        for container in docker("ps", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}").split()]
        refused = requests.post(AGENT_URL + "/", json={"user_id": "swarm-no-key", "payload": "Hi"}, timeout=30)

    assert api_key not in STACK_FILE.read_text()
    assert environments and not any(api_key in environment for environment in environments)
    assert all("PARLEY_API_KEYS_FILE=/run/secrets/parley_api_keys" in environment for environment in environments)
    assert refused.status_code == 401


def test_a_dialog_through_the_agent_of_the_stack_answers_paris(swarm_stack):
    with step("a turn through the agent (published in host mode on 127.0.0.1:4242)"):
        answer = turn("swarm-paris", "What is the capital of France?")
        print(f"    {answer['response']!r} ({answer['active_skill']})")

    assert "Paris" in answer["response"]


def test_turns_reach_both_llm_replicas(swarm_stack):
    with step("rounds of 4 parallel dialogs until both LLM replicas have served /respond"):
        for round_number in range(1, 6):
            dialogs_in_parallel(f"swarm-spread-{round_number}", turns_each=1)
            counts = respond_requests_per_container()
            print(f"    round {round_number}: POST /respond per replica {counts}")
            if len(counts) == 2 and all(counts.values()):
                break
            time.sleep(6)  # past the LLM's keep-alive, so the skill opens fresh connections

    assert len(counts) == 2
    assert all(count > 0 for count in counts.values())


def test_killing_an_llm_replica_while_4_dialogs_run_loses_no_turn_and_the_replica_is_replaced(swarm_stack):
    victim = llm_containers()[0]
    killed_at: list[float] = []
    spans: list[tuple[float, float]] = []

    def kill_one_replica() -> None:
        # The moment the first turn is answered, the other three first turns are at the LLMs.
        deadline = time.monotonic() + 120
        while not spans and time.monotonic() < deadline:
            time.sleep(0.02)
        docker("kill", victim)
        killed_at.append(time.monotonic())
        print(f"    killed {victim[:12]}")

    with step("4 dialogs of 2 turns while one LLM replica's container is killed"):
        answers = dialogs_in_parallel("swarm-kill", turns_each=2, during=kill_one_replica, spans=spans)
        in_flight = sum(1 for started, ended in spans if started < killed_at[0] < ended)
        print(f"    {len(answers)} turns answered by {sorted({a['active_skill'] for a in answers})}; "
              f"{in_flight} were in flight at the kill")
        for line in skill_log_lines("LLM at"):
            print(f"    skill: {line}")
    with step("the agent's state holds every turn of the 4 dialogs, with its answer"):
        stored = {}
        for dialog_id in sorted({answer["dialog_id"] for answer in answers}):
            dialog = requests.get(f"{AGENT_URL}/api/dialogs/{dialog_id}", headers=HEADERS, timeout=30).json()
            stored[dialog_id] = [(u["text"], b["text"]) for u, b in zip(dialog["human_utterances"], dialog["bot_utterances"])]
        print(f"    {sum(map(len, stored.values()))} turns stored in {len(stored)} dialogs")
    with step("swarm replaces the killed replica"):
        wait_for("a new healthy LLM replica", lambda: running_llm_tasks() == 2 and victim not in llm_containers(), 600)
        print(f"    2 replicas running again {time.monotonic() - killed_at[0]:.1f}s after the kill")

    assert in_flight >= 1, "the kill landed between turns: it tested nothing"
    assert len(answers) == 8
    assert [answer for answer in answers if answer["active_skill"] != SKILL or not answer["response"]] == []
    assert len(stored) == 4 and all(len(turns) == 2 and all(bot for _, bot in turns) for turns in stored.values()), stored
    assert victim not in llm_containers()


def test_a_rolling_update_with_a_changed_env_keeps_answering(swarm_stack):
    before = set(llm_containers())
    answers: list[dict] = []
    failures: list[str] = []
    updating = threading.Event()
    updating.set()

    def keep_talking() -> None:
        number = 0
        while updating.is_set():
            number += 1
            try:
                answers.append(turn("swarm-rolling", QUESTIONS[number % len(QUESTIONS)]))
            except (requests.RequestException, ValueError) as error:
                failures.append(f"turn {number}: {error}")

    talker = threading.Thread(target=keep_talking)
    talker.start()
    try:
        with step(f"docker service update --env-add PARLEY_ROLLOUT=2 {LLM} (start-first, one at a time)"):
            docker("service", "update", "--env-add", "PARLEY_ROLLOUT=2", LLM, timeout=900)
    finally:
        updating.clear()
        talker.join()
    print(f"    {len(answers)} turns during the update, {len(failures)} failed")

    assert docker("service", "inspect", "--format", "{{.UpdateStatus.State}}", LLM) == "completed"
    after = set(llm_containers())
    assert len(after) == 2 and not after & before
    for container in after:
        assert "PARLEY_ROLLOUT=2" in docker("inspect", "--format", "{{json .Config.Env}}", container)
    assert failures == []
    assert answers
    assert [answer for answer in answers if answer["active_skill"] != SKILL or not answer["response"]] == []


def test_the_autoscaler_grows_the_llm_under_load_and_shrinks_it_after_with_no_failed_turn(swarm_stack):
    # The stack carries the card's bounds; the test shortens the delays (labels are read at every look).
    deployed = json.loads(docker("service", "inspect", "--format", "{{json .Spec.Labels}}", LLM))
    card = {f"parley.autoscaling.{key}": value for key, value in (("max_replicas", "2"), ("target_ongoing_requests", "2"),
                                                                  ("upscale_delay_s", "15"), ("downscale_delay_s", "120"))}
    for key, value in {"min_replicas": "1", "upscale_delay_s": "5", "downscale_delay_s": "20"}.items():
        docker("service", "update", "--detach", "--label-add", f"parley.autoscaling.{key}={value}", LLM)
    answers: list[dict] = []
    failures: list[str] = []
    replicas_seen: list[int] = []
    trickling, bursting = threading.Event(), threading.Event()

    def talk(user_id: str, going: threading.Event) -> None:
        number = 0
        while going.is_set():
            number += 1
            try:
                answers.append(turn(user_id, QUESTIONS[number % len(QUESTIONS)]))
            except (requests.RequestException, ValueError) as error:
                failures.append(f"{user_id} turn {number}: {error}")

    def replicas(count: int) -> bool:
        asked = llm_replicas_asked()
        if not replicas_seen or replicas_seen[-1] != asked:
            replicas_seen.append(asked)
        return asked == count and running_llm_tasks() == count

    with step("quiet: the autoscaler takes the LLM down to min_replicas (1) after downscale_delay_s (20)"):
        wait_for("1 LLM replica", lambda: replicas(1), 300)
    trickle = threading.Thread(target=talk, args=("swarm-autoscale-trickle", trickling))
    burst = [threading.Thread(target=talk, args=(f"swarm-autoscale-{index}", bursting)) for index in range(BURST_USERS)]
    trickling.set()
    bursting.set()
    trickle.start()
    try:
        with step(f"{BURST_USERS} more users talk at once: the autoscaler adds a replica (target 2 requests per replica)"):
            for thread in burst:
                thread.start()
            waited = wait_for("2 LLM replicas running", lambda: replicas(2), 600)
            print(f"    2 replicas {waited:.1f}s after the load began; {len(answers)} turns so far")
        bursting.clear()
        for thread in burst:
            thread.join()
        with step(f"the {BURST_USERS} stop (one user goes on, so a turn may be on the replica that goes): back to 1"):
            waited = wait_for("1 LLM replica", lambda: replicas(1), 300)
            print(f"    1 replica {waited:.1f}s after the load stopped")
    finally:
        bursting.clear()
        trickling.clear()
        trickle.join()
        for thread in burst:
            if thread.is_alive():
                thread.join()
    decisions = [line for line in autoscaler_log_lines() if ": scale " in line]
    for line in autoscaler_log_lines()[-12:]:
        print(f"    {line}")
    print(f"    autoscaler: {LLM_SERVICE} replicas {' -> '.join(map(str, replicas_seen))} under load; "
          f"{len(answers)} turns answered, failed: {len(failures)}")

    assert {key: deployed.get(key) for key in card} == card  # the card's bounds, as parley stack wrote them
    assert replicas_seen[-3:] == [1, 2, 1]
    assert any("scale 1 -> 2" in line for line in decisions) and any("scale 2 -> 1" in line for line in decisions)
    assert failures == []
    assert [answer for answer in answers if answer["active_skill"] != SKILL or not answer["response"]] == []
