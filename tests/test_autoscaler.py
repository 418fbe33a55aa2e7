"""The autoscaler's own logic (tier: in-process, plus a real LLM service on loopback for the load it
reads). Its policy is plain data in, a decision out (Ray Serve's rules: ceil(load / target) within
the bounds, after the up- or downscale delay); its loop is driven here through a swarm kept in
memory, since scaling needs a real swarm: `make test-swarm` (tests/swarm/test_stack_in_swarm.py)
runs the real autoscaler against real replicas, through 1 -> 2 -> 1 under load."""

from __future__ import annotations

import logging

import pytest

from services.autoscaler.app import create_app
from services.autoscaler.load import LoadReader, LoadUnknownError, gauges_from_metrics
from services.autoscaler.policy import Bounds, BoundsError, Observation, ServicePolicy
from services.autoscaler.service import Autoscaler
from services.autoscaler.settings import Settings
from services.autoscaler.swarm import Replica, ScaledService, SwarmError
from support.recording_server import Reply, recording_server

BOUNDS = Bounds(min_replicas=1, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=10, downscale_delay_s=60, port=8180)


def seen(replicas: int, *loads: int, **kwargs) -> Observation:
    return Observation(replicas, tuple(loads), **kwargs)


# --- the policy ----------------------------------------------------------------------------------


def test_a_load_over_the_target_is_granted_more_replicas_only_after_the_upscale_delay():
    policy = ServicePolicy()

    first = policy.decide(BOUNDS, seen(1, 5), now=100)
    still = policy.decide(BOUNDS, seen(1, 5), now=109)
    granted = policy.decide(BOUNDS, seen(1, 5), now=110)

    assert (first.action, first.target) == ("wait", 3)  # ceil(5 / 2)
    assert still.action == "wait"
    assert (granted.action, granted.replicas, granted.target) == ("scale", 1, 3)
    assert "5 request(s) in progress on 1 replica(s), target 2 per replica" in granted.reason
    assert "upscale_delay_s 10" in granted.reason


def test_the_wish_is_clamped_to_max_replicas():
    policy = ServicePolicy()
    policy.decide(BOUNDS, seen(1, 40), now=0)

    assert policy.decide(BOUNDS, seen(1, 40), now=10).target == 3


def test_a_quiet_service_shrinks_to_min_replicas_after_the_downscale_delay():
    policy = ServicePolicy()

    waiting = policy.decide(BOUNDS, seen(3, 0, 1, 0), now=0)
    shrunk = policy.decide(BOUNDS, seen(3, 0, 1, 0), now=60)

    assert (waiting.action, waiting.target) == ("wait", 1)
    assert (shrunk.action, shrunk.target) == ("scale", 1)
    assert "downscale_delay_s 60" in shrunk.reason


def test_a_wish_that_changes_direction_or_lapses_starts_the_clock_again():
    policy = ServicePolicy()
    policy.decide(BOUNDS, seen(2, 9, 9), now=0)  # wants 3
    policy.decide(BOUNDS, seen(2, 2, 2), now=5)  # 2 is right: the wish lapses
    policy.decide(BOUNDS, seen(2, 9, 9), now=6)  # wants 3 again, from now

    assert policy.decide(BOUNDS, seen(2, 9, 9), now=15).action == "wait"
    assert policy.decide(BOUNDS, seen(2, 9, 9), now=16).action == "scale"


def test_the_right_number_of_replicas_is_kept_with_the_load_as_its_reason():
    decision = ServicePolicy().decide(BOUNDS, seen(2, 2, 1), now=0)

    assert (decision.action, decision.target) == ("hold", 2)
    assert decision.describe("parley_llm") == "parley_llm: keep 2: 3 request(s) in progress on 2 replica(s), target 2 per replica"


def test_replicas_outside_changed_bounds_are_brought_into_them_at_once():
    policy = ServicePolicy()
    raised = Bounds(**{**BOUNDS.__dict__, "min_replicas": 2})
    lowered = Bounds(**{**BOUNDS.__dict__, "max_replicas": 1})

    up = policy.decide(raised, seen(1, 0), now=0)
    down = policy.decide(lowered, seen(3, 9, 9, 9), now=0)

    assert (up.action, up.target, up.reason) == ("scale", 2, "outside the bounds (min_replicas is 2)")
    assert (down.action, down.target, down.reason) == ("scale", 1, "outside the bounds (max_replicas is 1)")


def test_nothing_is_decided_during_a_rolling_update_or_when_no_replica_reports():
    policy = ServicePolicy()

    updating = policy.decide(BOUNDS, seen(1, 9, updating=True), now=0)
    silent = policy.decide(BOUNDS, seen(2, unreachable=2), now=0)

    assert (updating.action, updating.reason) == ("hold", "a rolling update is under way")
    assert (silent.action, silent.reason) == ("hold", "no replica reported its load (2 did not answer)")


def test_bounds_travel_as_labels_and_back():
    assert Bounds.from_labels(BOUNDS.labels()) == BOUNDS


@pytest.mark.parametrize("labels, message", [
    ({}, "label parley.autoscaling.min_replicas is missing"),
    ({**BOUNDS.labels(), "parley.autoscaling.max_replicas": "many"}, "parley.autoscaling.max_replicas='many' is not a number"),
    ({**BOUNDS.labels(), "parley.autoscaling.min_replicas": "4"}, "min_replicas (4) <= max_replicas (3)"),
])
def test_unusable_labels_are_named(labels, message):
    with pytest.raises(BoundsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Bounds.from_labels(labels)


# --- reading a replica's load ----------------------------------------------------------------------


def test_the_load_is_read_from_the_prometheus_gauges_summed_over_their_labels():
    text = (
        "# HELP parley:num_requests_running Requests being generated.\n"
        "# TYPE parley:num_requests_running gauge\n"
        'parley:num_requests_running{model_name="a"} 2.0\n'
        'parley:num_requests_running{model_name="b"} 1.0\n'
        'parley:num_requests_waiting{model_name="a"} 4.0\n'
        "parley:num_requests_waiting_total 99\n"
    )

    assert gauges_from_metrics(text) == {"parley:num_requests_running": 3.0, "parley:num_requests_waiting": 4.0}
    assert gauges_from_metrics("parley:num_requests_running 1\n") is None


def test_the_load_of_a_real_llm_replica_comes_from_its_health_when_it_has_no_metrics(tiny_llm):
    assert LoadReader(timeout_seconds=5).ongoing(tiny_llm.base_url) == 0


def test_a_replica_with_metrics_is_asked_with_the_stacks_key_and_its_gauges_used():
    from pydantic import SecretStr

    metrics = "parley:num_requests_running 3\nparley:num_requests_waiting 2\n"
    with recording_server(lambda request: Reply(200, text=metrics)) as replica:
        load = LoadReader(timeout_seconds=5, api_key=SecretStr("k-123")).ongoing(replica.base_url)
    assert load == 5
    assert replica.requests[0].path == "/metrics"
    assert replica.requests[0].headers["Authorization"] == "Bearer k-123"


def test_a_replica_that_does_not_answer_has_no_known_load():
    with recording_server() as gone:
        url = gone.base_url
    with pytest.raises(LoadUnknownError, match="did not answer"):
        LoadReader(timeout_seconds=2).ongoing(url)


# --- the loop, on a swarm kept in memory ------------------------------------------------------------


class MemorySwarm:
    """A swarm of one autoscaled service, kept in memory: what the loop asks and what it scales."""

    def __init__(self, replicas: int, loads: dict[str, int | None]):
        self.replicas = replicas
        self.loads = loads  # address -> requests in progress (None: does not answer)
        self.scaled: list[int] = []
        self.failure: str | None = None
        self.known_stack = "parley"

    def check_manager(self) -> None:
        if self.failure:
            raise SwarmError(self.failure)

    def services(self) -> list[ScaledService]:
        running = [Replica(f"t{index}", "node-a" if index % 2 else "node-b", address) for index, address in enumerate(self.loads)]
        return [ScaledService("s1", "parley_llm", self.replicas, False, running, bounds=BOUNDS)]

    def scale(self, service: ScaledService, replicas: int) -> None:
        self.scaled.append(replicas)
        self.replicas = replicas


class MemoryLoads:
    def __init__(self, swarm: MemorySwarm):
        self.swarm = swarm

    def ongoing(self, base_url: str) -> int:
        load = self.swarm.loads[base_url.removeprefix("http://").rsplit(":", 1)[0]]
        if load is None:
            raise LoadUnknownError(f"{base_url} did not answer")
        return load


def test_the_loop_scales_through_the_engine_and_logs_each_decision_with_its_reason(caplog):
    swarm = MemorySwarm(replicas=1, loads={"10.0.0.5": 6})
    clock = iter([0.0, 11.0])
    autoscaler = Autoscaler(swarm, MemoryLoads(swarm), clock=lambda: next(clock))  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO, logger="autoscaler"):
        autoscaler.run_once()
        autoscaler.run_once()

    assert swarm.scaled == [3]
    lines = [record.getMessage() for record in caplog.records if record.name == "autoscaler"]
    assert lines[0].startswith("parley_llm: wants 3 (has 1): 6 request(s) in progress on 1 replica(s)")
    assert lines[1].startswith("parley_llm: scale 1 -> 3: 6 request(s) in progress")
    assert all(record.name == "autoscaler" for record in caplog.records)


def test_a_replica_that_does_not_report_is_named_and_the_others_decide():
    swarm = MemorySwarm(replicas=2, loads={"10.0.0.5": 1, "10.0.0.6": None})
    autoscaler = Autoscaler(swarm, MemoryLoads(swarm), clock=lambda: 0.0)  # type: ignore[arg-type]

    [decision] = autoscaler.run_once()

    assert "on 1 replica(s), target 2 per replica, 1 replica(s) not reporting" in decision.reason
    assert autoscaler.status["parley_llm"].per_node == {"node-b": 1, "node-a": 1}


def test_health_is_503_with_the_reason_while_the_engine_cannot_scale():
    swarm = MemorySwarm(replicas=1, loads={})
    swarm.failure = "this engine is not a swarm manager: place the autoscaler on a manager node (node.role == manager)"
    autoscaler = Autoscaler(swarm, MemoryLoads(swarm))  # type: ignore[arg-type]
    client = create_app(Settings.from_env({}), autoscaler, start=False).test_client()

    autoscaler.run_once()
    response = client.get("/health")

    assert response.status_code == 503
    assert response.get_json()["error"].startswith("this engine is not a swarm manager")
    assert client.get("/ping").status_code == 503


def test_health_reports_each_service_and_its_last_decision_once_it_can_scale():
    swarm = MemorySwarm(replicas=1, loads={"10.0.0.5": 0})
    autoscaler = Autoscaler(swarm, MemoryLoads(swarm))  # type: ignore[arg-type]
    client = create_app(Settings.from_env({}), autoscaler, start=False).test_client()

    autoscaler.run_once()
    body = client.get("/health").get_json()

    assert body["status"] == "ok" and body["stack"] == "parley"
    assert body["services"]["parley_llm"]["last_decision"].startswith("parley_llm: keep 1: 0 request(s) in progress")
