"""The autoscaler's loop: look at each autoscaled service, decide, scale, and log why.

Every AUTOSCALER_INTERVAL_S it lists its stack's services that carry autoscaling labels, asks each
running replica for its requests in progress (services/autoscaler/load.py), lets the service's
`ServicePolicy` decide (services/autoscaler/policy.py) and scales through the engine's API. Each
decision to scale is logged at INFO with its reason, and so is each change of what a service
wants or why it keeps its replicas (the logger is named `autoscaler`, so every line says so);
`status()` keeps the last decision of each service for `/health`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from services.autoscaler.load import LoadReader, LoadUnknownError
from services.autoscaler.policy import Decision, Observation, ServicePolicy
from services.autoscaler.swarm import ScaledService, Swarm, SwarmError

logger = logging.getLogger("autoscaler")


@dataclass
class ServiceStatus:
    replicas: int
    per_node: dict[str, int]
    last_decision: str


class Autoscaler:
    """Decides for every autoscaled service of a stack; `run_once` is one look, `run_forever` the loop."""

    def __init__(self, swarm: Swarm, loads: LoadReader, clock: Callable[[], float] = time.monotonic):
        self.swarm = swarm
        self.loads = loads
        self.clock = clock
        self.policies: dict[str, ServicePolicy] = {}
        self.status: dict[str, ServiceStatus] = {}
        self.error: str | None = "not started"
        self._said: dict[str, str] = {}  # what was last logged per service, so a steady state is logged once

    def run_once(self) -> list[Decision]:
        try:
            self.swarm.check_manager()
            services = self.swarm.services()
        except SwarmError as error:
            self._report_error(str(error))
            return []
        self.error = None
        decisions = []
        for service in services:
            decision = self._decide(service)
            if decision is not None:
                decisions.append(decision)
        return decisions

    def _decide(self, service: ScaledService) -> Decision | None:
        per_node = dict(Counter(replica.node for replica in service.running))
        if service.bounds is None:
            self._say(service.name, logging.WARNING, f"{service.name}: not scaled: {service.bounds_error}")
            return None
        loads, unreachable = [], 0
        for replica in service.running:
            if replica.address is None:
                unreachable += 1
                continue
            try:
                loads.append(self.loads.ongoing(f"http://{replica.address}:{service.bounds.port}"))
            except LoadUnknownError as error:
                unreachable += 1
                logger.debug("%s: %s", service.name, error)
        observation = Observation(service.replicas, tuple(loads), unreachable, service.updating)
        decision = self.policies.setdefault(service.id, ServicePolicy()).decide(service.bounds, observation, self.clock())
        text = decision.describe(service.name)
        if decision.action == "scale":
            try:
                self.swarm.scale(service, decision.target)
            except SwarmError as error:
                text = f"{text}; failed, tried again next time: {error}"
            self._say(service.name, logging.INFO, text, always=True)
        else:
            # The same kind of decision for the same counts is logged once, not every interval.
            self._say(service.name, logging.INFO, text, key=f"{decision.action} {decision.replicas} {decision.target}")
        self.status[service.name] = ServiceStatus(service.replicas, per_node, text)
        return decision

    def _say(self, service: str, level: int, text: str, *, key: str | None = None, always: bool = False) -> None:
        key = key or text
        if always or self._said.get(service) != key:
            logger.log(level, "%s", text)
        self._said[service] = "" if always else key

    def _report_error(self, message: str) -> None:
        if self.error != message:
            logger.error("cannot scale: %s", message)
        self.error = message

    def run_forever(self, interval_seconds: float, stop: threading.Event) -> None:
        logger.info("looking at the replicas every %gs", interval_seconds)
        while not stop.is_set():
            started = self.clock()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure; it is logged
                logger.exception("one look at the replicas failed")
            stop.wait(max(0.0, interval_seconds - (self.clock() - started)))
