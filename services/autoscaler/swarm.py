"""The swarm as the autoscaler sees it, through the engine's API (Docker SDK for Python).

Its stack's services that carry autoscaling labels (`parley.autoscaling.*`), the replicas each asks
for, whether a rolling update runs, where each running replica can be reached (its address on a
network the autoscaler shares with it: Swarm's task addresses work in both endpoint modes, vip and
dnsrr) and on which node it runs; and scaling a service. The engine must be a swarm manager: the
stack places the autoscaler on one, with the engine's socket mounted.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import docker
from docker.errors import DockerException, NotFound

from services.autoscaler.policy import LABEL_PREFIX, Bounds, BoundsError

STACK_LABEL = "com.docker.stack.namespace"
UPDATING_STATES = ("updating", "rollback_started")


class SwarmError(RuntimeError):
    """The engine cannot be used for scaling (unreachable, not a swarm manager, no stack); the message says why."""


@dataclass(frozen=True)
class Replica:
    task_id: str
    node: str  # the node's hostname (its id when unknown)
    address: str | None  # where the replica answers, without the port; None: no shared network


@dataclass
class ScaledService:
    id: str
    name: str
    replicas: int
    updating: bool
    running: list[Replica]
    bounds: Bounds | None = None
    bounds_error: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


class Swarm:
    """One engine connection, made on first use (the API version is agreed with the engine then);
    the stack and the autoscaler's own networks are found once."""

    def __init__(self, docker_host: str, stack: str | None = None, client: docker.DockerClient | None = None):
        self.docker_host = docker_host
        self._client = client
        self._stack = stack
        self._own_networks: set[str] | None = None
        self._node_names: dict[str, str] = {}

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.DockerClient(base_url=self.docker_host, version="auto", timeout=30)
            except DockerException as error:
                raise SwarmError(f"cannot reach the engine at {self.docker_host} (DOCKER_HOST): {error}") from None
        return self._client

    def check_manager(self) -> None:
        try:
            info = self.client.info()
        except DockerException as error:
            raise SwarmError(f"the engine does not answer: {error}") from None
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise SwarmError("this engine is not a swarm manager: place the autoscaler on a manager node (node.role == manager)")

    @property
    def stack(self) -> str:
        """The stack whose services are scaled: STACK_NAMESPACE, else the one this container belongs to."""
        if self._stack is None:
            labels = self._own_container().get("Config", {}).get("Labels") or {}
            if STACK_LABEL not in labels:
                raise SwarmError("not running in a stack: set STACK_NAMESPACE to the stack whose services to scale")
            self._stack = labels[STACK_LABEL]
        return self._stack

    @property
    def known_stack(self) -> str | None:
        """The stack, if it is known already (asks the engine nothing)."""
        return self._stack

    def _own_container(self) -> dict[str, Any]:
        try:
            return self.client.api.inspect_container(socket.gethostname())
        except NotFound:
            return {}
        except DockerException as error:
            raise SwarmError(f"cannot inspect this container: {error}") from None

    def own_networks(self) -> set[str]:
        """The ids of the networks this container is on (empty outside a container)."""
        if self._own_networks is None:
            networks = (self._own_container().get("NetworkSettings") or {}).get("Networks") or {}
            self._own_networks = {entry.get("NetworkID") for entry in networks.values() if entry.get("NetworkID")}
        return self._own_networks

    def services(self) -> list[ScaledService]:
        """The stack's services with autoscaling labels, each with its running replicas."""
        filters = {"label": [f"{STACK_LABEL}={self.stack}", f"{LABEL_PREFIX}max_replicas"]}
        try:
            found = self.client.api.services(filters=filters)
        except DockerException as error:
            raise SwarmError(f"cannot list the services: {error}") from None
        return [self._scaled_service(service) for service in found]

    def _scaled_service(self, service: dict[str, Any]) -> ScaledService:
        spec = service["Spec"]
        labels = spec.get("Labels") or {}
        replicas = ((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", 0)
        updating = ((service.get("UpdateStatus") or {}).get("State")) in UPDATING_STATES
        scaled = ScaledService(service["ID"], spec["Name"], replicas, updating, self._running(service["ID"]), labels=labels)
        try:
            scaled.bounds = Bounds.from_labels(labels)
        except BoundsError as error:
            scaled.bounds_error = str(error)
        return scaled

    def _running(self, service_id: str) -> list[Replica]:
        tasks = self.client.api.tasks(filters={"service": service_id, "desired-state": "running"})
        return [
            Replica(task["ID"], self._node_name(task.get("NodeID", "")), self._address(task))
            for task in tasks
            if (task.get("Status") or {}).get("State") == "running"
        ]

    def _address(self, task: dict[str, Any]) -> str | None:
        own = self.own_networks()
        for attachment in task.get("NetworksAttachments") or []:
            network = attachment.get("Network") or {}
            ingress = ((network.get("Spec") or {}).get("Ingress")) or (network.get("Spec") or {}).get("Name") == "ingress"
            shared = network.get("ID") in own if own else not ingress
            if shared and attachment.get("Addresses"):
                return attachment["Addresses"][0].split("/", 1)[0]
        return None

    def _node_name(self, node_id: str) -> str:
        if node_id not in self._node_names:
            try:
                node = self.client.api.inspect_node(node_id)
                self._node_names[node_id] = (node.get("Description") or {}).get("Hostname") or node_id[:12]
            except DockerException:
                return node_id[:12]
        return self._node_names[node_id]

    def scale(self, service: ScaledService, replicas: int) -> None:
        """Set the service's replicas, as `docker service scale` does: its spec as stored, with only
        the replicas changed. (docker-py's own `scale` sends the spec with the engine's defaults
        filled in, which differs from the stored one, so Swarm replaces every replica as in a
        rolling update.)"""
        try:
            current = self.client.api.inspect_service(service.id)
            spec = current["Spec"]
            self.client.api.update_service(
                service.id, current["Version"]["Index"],
                task_template=spec.get("TaskTemplate"), name=spec.get("Name"), labels=spec.get("Labels"),
                mode={"Replicated": {"Replicas": replicas}}, update_config=spec.get("UpdateConfig"),
                rollback_config=spec.get("RollbackConfig"), endpoint_spec=spec.get("EndpointSpec"),
            )
        except DockerException as error:
            raise SwarmError(f"scaling {service.name} to {replicas} failed: {error}") from None
