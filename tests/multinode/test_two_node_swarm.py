"""The universal_prompted_assistant distribution on a real two-node swarm, both nodes on this machine.

The second node is a second Docker engine in a network namespace of its own (tests/support/
swarm_nodes.py), joined to this engine's swarm over a veth pair; Swarm's overlay network runs over
it (VXLAN). The images reach it through a registry: Debian's docker-registry on this end of the
veth, with a certificate both engines trust, filled by `parley stack --push`. The steps are the
README's "Beyond one machine: more machines":

1. build the images (make test-docker's, from its build cache), start the registry, `parley stack
   --push` (tags and pushes every image, and writes their registry names into the stack file);
2. `docker swarm init` on this engine, at its veth address; label it for the agent's state; the
   checkout's key (.env_secret) as the Docker secret `parley_api_keys`; `docker stack deploy`
   (every node pulls from the registry);
3. the second engine joins as a worker; at least 2 LLM replicas (the autoscaler's min_replicas
   label): Swarm spreads them, one on each node, the worker pulling the LLM image;
4. 4 users talk; once the worker's replica has answered, the worker's engine is stopped mid-dialog
   (SIGTERM, as an operator stops a node): its replica finishes what it has and goes, the manager
   reschedules it on itself, and the dialogs go on;
5. every turn a user was answered is in the agent's state exactly once, in order: the summary line
   counts them (`2 nodes ... lost: 0`).

The stack, the swarm, the worker's engine (its containers, networks, volumes and swarm state), the
namespace and veth, the registry, its certificate and the pushed tags are removed at the end, also
on failure, and the test checks that nothing is left but two caches, as the first engine keeps its
data root: the worker's images and the registry's storage, so a second run pushes and pulls only
what changed. Run by `make test-multinode` as root, on the engine of `make test-docker` (its
`engine` fixture: started by `parley engine start` when none runs, stopped after).
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import requests
from support.swarm_nodes import NodeNetwork, SecondEngine, TlsRegistry, second_node

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
IMAGES_PROJECT = docker_tests.PROJECT
STACK = "parley-test-multinode"
LLM = f"{STACK}_transformers-lm-smollm2"
AUTOSCALER = f"{STACK}_autoscaler"
AGENT_URL = "http://127.0.0.1:4242"
SKILL = "prompted_skill"
OUTPUT_DIR = REPO_ROOT / "tests" / "output"
STACK_FILE = OUTPUT_DIR / "multinode-stack.yml"
QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "Name a colour.", "Say hello."]
USERS = 4
# The agent's key, as every request sends it (set by the two_nodes fixture).
HEADERS: dict[str, str] = {}
NETWORK = NodeNetwork()
WORKER = SecondEngine(NETWORK, log_path=OUTPUT_DIR / "multinode-worker-dockerd.log")
REGISTRY = TlsRegistry(NETWORK.host_address)


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    completed = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        pytest.fail(f"`docker {' '.join(args)}` exited with {completed.returncode}:\n{completed.stdout}{completed.stderr}", pytrace=False)
    return completed.stdout.strip()


def wait_for(what: str, condition, timeout_seconds: float) -> float:
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


def llm_replicas_per_node() -> Counter:
    """Running LLM replicas by node hostname."""
    listing = docker("service", "ps", LLM, "--filter", "desired-state=running", "--format", "{{.Node}} {{.CurrentState}}", check=False)
    return Counter(line.split()[0] for line in listing.splitlines() if line.split()[1:2] == ["Running"])


def nodes() -> dict[str, str]:
    """Each node's hostname and status (Ready, Down)."""
    listing = docker("node", "ls", "--format", "{{.Hostname}} {{.Status}}")
    return dict(line.split(maxsplit=1) for line in listing.splitlines())


def worker_llm_requests() -> int:
    """POST /respond answered by the LLM replica on the worker (its container's access log)."""
    if not WORKER.answers():
        return 0
    total = 0
    for container in WORKER.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={LLM}", check=False).split():
        logs = subprocess.run(["docker", "-H", f"unix://{WORKER.socket}", "logs", container], capture_output=True, text=True)
        total += sum(1 for line in (logs.stdout + logs.stderr).splitlines() if '"POST /respond' in line)
    return total


def stack_leftovers() -> list[str]:
    label = f"label=com.docker.stack.namespace={STACK}"
    found = docker("ps", "-aq", "--filter", label, check=False).split()
    found += docker("network", "ls", "-q", "--filter", label, check=False).split()
    found += docker("volume", "ls", "-q", "--filter", label, check=False).split()
    found += docker("image", "ls", "-q", f"{REGISTRY.name}/*", check=False).split()
    return found


@pytest.fixture(scope="module")
def two_nodes(engine: dict[str, str], api_key: str) -> Iterator[dict[str, str]]:
    """The stack on a swarm of this engine (manager) and a second one (worker), 2 LLM replicas spread
    over both, the checkout's key as the Docker secret parley_api_keys; everything removed after,
    also on failure."""
    environment = engine
    HEADERS["Authorization"] = f"Bearer {api_key}"
    parley = str(Path(sys.executable).parent / "parley")
    if docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "inactive":
        pytest.fail("this engine is already part of a swarm: the test makes and leaves its own", pytrace=False)
    had_gateway_bridge = bool(docker("network", "ls", "-q", "--filter", "name=^docker_gwbridge$"))
    with step("build the images (make test-docker's, from its build cache, and the autoscaler's)"):
        run([*compose("cpu.yml", "autoscaler.yml"), "--progress", "plain", "build"], environment, "multinode-build.log")
    left: list[str] = []
    try:
        with second_node(NETWORK, WORKER, REGISTRY):
            print(f"\n    worker: dockerd in netns {NETWORK.namespace} ({NETWORK.node_address}, hostname {WORKER.hostname}); "
                  f"registry https://{REGISTRY.name}")
            try:
                with step(f"parley stack {DIST} --overlay cpu.yml --endpoint-mode dnsrr --push {REGISTRY.name}"):
                    run([parley, "stack", DIST, "--overlay", "cpu.yml", "--endpoint-mode", "dnsrr", "--project", IMAGES_PROJECT,
                         "--push", REGISTRY.name, "-o", str(STACK_FILE)], environment, "multinode-push.log")
                    print(f"    {STACK_FILE}")
                with step(f"docker swarm init --advertise-addr {NETWORK.host_address}; label it parley-state=true"):
                    docker("swarm", "init", "--advertise-addr", NETWORK.host_address, "--dispatcher-heartbeat", "2s")
                    docker("node", "update", "--label-add", "parley-state=true", docker("info", "--format", "{{.Swarm.NodeID}}"))
                with step("docker secret create parley_api_keys (the checkout's key)"):
                    created = subprocess.run(["docker", "secret", "create", "parley_api_keys", "-"], input=api_key,
                                             capture_output=True, text=True)
                    assert created.returncode == 0, created.stderr
                with step(f"docker stack deploy {STACK} (images from {REGISTRY.name})"):
                    docker("stack", "deploy", "-c", str(STACK_FILE), STACK, timeout=300)
                    wait_for("the agent's /health on 127.0.0.1:4242", agent_healthy, 600)
                with step(f"the worker joins ({NETWORK.node_address}), then at least 2 LLM replicas (min_replicas label)"):
                    token = docker("swarm", "join-token", "-q", "worker")
                    WORKER.docker("swarm", "join", "--token", token, "--advertise-addr", NETWORK.node_address, f"{NETWORK.host_address}:2377")
                    wait_for("the worker Ready", lambda: nodes().get(WORKER.hostname) == "Ready", 120)
                    docker("service", "update", "--detach", "--label-add", "parley.autoscaling.min_replicas=2", LLM)
                    waited = wait_for("an LLM replica running on each node", lambda: len(llm_replicas_per_node()) == 2, 900)
                    print(f"    nodes {nodes()}; LLM replicas per node {dict(llm_replicas_per_node())} after {waited:.1f}s")
                yield environment
            finally:
                with step(f"docker stack rm {STACK}; docker swarm leave --force (both nodes)"):
                    with open(OUTPUT_DIR / "multinode-services.log", "w") as log:
                        for service in docker("stack", "services", "-q", STACK, check=False).split():
                            subprocess.run(["docker", "service", "logs", "--raw", service], stdout=log, stderr=subprocess.STDOUT, timeout=120)
                    docker("stack", "rm", STACK, check=False)
                    with contextlib.suppress(BaseException):
                        wait_for("the stack's containers gone", lambda: not docker(
                            "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}", check=False), 180)
                    if WORKER.answers():
                        WORKER.docker("swarm", "leave", "--force", check=False)
                    docker("swarm", "leave", "--force", check=False)
                    if not had_gateway_bridge:
                        docker("network", "rm", "docker_gwbridge", check=False)
                    for volume in docker("volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}", check=False).split():
                        docker("volume", "rm", volume, check=False)
                    for image in docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", f"{REGISTRY.name}/*", check=False).split():
                        docker("image", "rm", image, check=False)
                    print(f"    service logs: {OUTPUT_DIR / 'multinode-services.log'}; the worker's: {WORKER.log_file}")
                with step("empty the worker's engine (its images stay, a cache for the next run), stop it"):
                    try:
                        WORKER.empty()
                    except Exception as error:  # noqa: BLE001 - then its whole data root goes, in second_node's cleanup
                        print(f"    could not: {error}; its data root goes too")
    finally:
        with step("what is left"):
            left = stack_leftovers()
            swarm_state = docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False)
            left += [f"netns {NETWORK.namespace}"] if NETWORK.exists() else []
            left += WORKER.leftovers() + REGISTRY.leftovers()
            caches = [str(path) for path in (WORKER.data_root, REGISTRY.storage) if path.exists()]
            print(f"    left: {left or 'nothing'}; swarm: {swarm_state}; caches for the next run: {caches or 'none'}")
    assert left == [] and swarm_state == "inactive", "the stack, the swarm, the second node or the registry was left behind"


def test_two_nodes_answer_dialogs_and_a_stopped_worker_costs_no_acknowledged_turn(two_nodes):
    sent: dict[str, list[str]] = {f"multinode-{index}": [] for index in range(USERS)}
    answered: dict[str, list[tuple[str, dict]]] = {user: [] for user in sent}
    failures: list[str] = []
    talking = threading.Event()
    talking.set()

    def talk(user_id: str) -> None:
        number = 0
        while talking.is_set():
            number += 1
            text = f"{QUESTIONS[number % len(QUESTIONS)]} ({number})"
            sent[user_id].append(text)
            try:
                response = requests.post(AGENT_URL + "/", json={"user_id": user_id, "payload": text}, headers=HEADERS, timeout=180)
                response.raise_for_status()
                answered[user_id].append((text, response.json()))
            except (requests.RequestException, ValueError) as error:
                failures.append(f"{user_id} turn {number}: {error}")

    def turns_answered() -> int:
        return sum(map(len, answered.values()))

    before = dict(llm_replicas_per_node())
    users = [threading.Thread(target=talk, args=(user,)) for user in sent]
    for user in users:
        user.start()
    try:
        with step(f"{USERS} users talk until the worker's LLM replica has answered"):
            wait_for("a turn answered on the worker", lambda: worker_llm_requests() > 0, 300)
            worker_served = worker_llm_requests()
            print(f"    worker's replica answered {worker_served} POST /respond; {turns_answered()} turns so far")
        with step(f"stop the worker's engine mid-dialog (SIGTERM to its dockerd, {WORKER.hostname})"):
            in_flight_at_stop = sum(len(sent[user]) - len(answered[user]) for user in sent)
            stopped = WORKER.stop(timeout_seconds=180)
            print(f"    stopped: {stopped}; {in_flight_at_stop} turns were in flight")
        with step("the manager marks the worker Down and reschedules its replica on itself"):
            waited = wait_for("2 LLM replicas on the manager", lambda: nodes().get(WORKER.hostname) == "Down"
                              and sum(llm_replicas_per_node().values()) == 2 and WORKER.hostname not in llm_replicas_per_node(), 600)
            after = dict(llm_replicas_per_node())
            print(f"    nodes {nodes()}; LLM replicas per node {after} {waited:.1f}s after the stop")
        with step("the dialogs go on on the manager alone"):
            mark = turns_answered()
            wait_for(f"{USERS} more turns answered", lambda: turns_answered() >= mark + USERS, 300)
    finally:
        talking.clear()
        for user in users:
            user.join()
    with step("the agent's state against what each user was answered"):
        lost = duplicated = stored_turns = 0
        for user, turns in answered.items():
            if not turns:
                continue
            dialog = requests.get(f"{AGENT_URL}/api/dialogs/{turns[0][1]['dialog_id']}", headers=HEADERS, timeout=30).json()
            stored = [utterance["text"] for utterance in dialog["human_utterances"]]
            stored_turns += len(stored)
            counts = Counter(stored)
            duplicated += sum(count - 1 for count in counts.values() if count > 1)
            lost += sum(1 for text, _ in turns if counts[text] == 0)
            acknowledged_in_order = [text for text in stored if text in {t for t, _ in turns}]
            assert acknowledged_in_order == [text for text, _ in turns], f"{user}: stored out of order"
        acknowledged = turns_answered()
        not_from_the_skill = [answer for turns in answered.values() for _, answer in turns
                              if answer["active_skill"] != SKILL or not answer["response"]]
        manager = next(name for name in nodes() if name != WORKER.hostname)
        print(f"    multinode: 2 nodes ({manager}, {WORKER.hostname}); LLM replicas per node {before} -> {after} after the "
              f"worker stopped; turns: {sum(map(len, sent.values()))} sent, {acknowledged} answered, {stored_turns} stored, "
              f"lost: {lost}, duplicated: {duplicated}, failed: {len(failures)}")

    assert len(nodes()) == 2
    assert before == {manager: 1, WORKER.hostname: 1}
    assert after == {manager: 2}
    assert in_flight_at_stop >= 1, "the worker stopped between turns: it tested nothing"
    assert lost == 0 and duplicated == 0
    assert failures == []
    assert not_from_the_skill == []
