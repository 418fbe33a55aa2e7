"""How many replicas a service should have: Ray Serve's autoscaling policy, as plain data and one function.

A service's bounds travel as labels on its Swarm service (`parley.autoscaling.*`, written by
`parley stack` from the card's `deploy.autoscaling`; `docker service update --label-add` changes
them while it runs). Each look at the replicas (`Observation`) gives a `Decision`:

- below `min_replicas` or above `max_replicas` (the bounds changed): scale into them at once;
- else the wish is ceil(requests in progress / target_ongoing_requests), within the bounds; a wish
  for more replicas is granted once it has held for `upscale_delay_s`, one for fewer once it has
  held for `downscale_delay_s` (a wish in the other direction, or none, starts the clock again);
- nothing while a rolling update runs, or while no replica reports its load.

Every decision carries its reason, in words, for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

LABEL_PREFIX = "parley.autoscaling."
# The card's fields, as labels, with the port the replicas serve /health and /metrics on.
BOUND_FIELDS = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
PORT_LABEL = LABEL_PREFIX + "port"


class BoundsError(ValueError):
    """A service's autoscaling labels that cannot be used; the message names the label."""


@dataclass(frozen=True)
class Bounds:
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    upscale_delay_s: float
    downscale_delay_s: float
    port: int

    def labels(self) -> dict[str, str]:
        """The Swarm service labels that carry these bounds."""
        values = {name: getattr(self, name) for name in BOUND_FIELDS}
        return {**{LABEL_PREFIX + name: f"{value:g}" for name, value in values.items()}, PORT_LABEL: str(self.port)}

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> "Bounds":
        values: dict[str, float] = {}
        for name in (*BOUND_FIELDS, "port"):
            label = LABEL_PREFIX + name
            try:
                values[name] = float(labels[label])
            except KeyError:
                raise BoundsError(f"label {label} is missing") from None
            except ValueError:
                raise BoundsError(f"label {label}={labels[label]!r} is not a number") from None
        bounds = cls(
            min_replicas=int(values["min_replicas"]), max_replicas=int(values["max_replicas"]),
            target_ongoing_requests=values["target_ongoing_requests"], upscale_delay_s=values["upscale_delay_s"],
            downscale_delay_s=values["downscale_delay_s"], port=int(values["port"]),
        )
        if not 1 <= bounds.min_replicas <= bounds.max_replicas:
            raise BoundsError(f"labels: need 1 <= min_replicas ({bounds.min_replicas}) <= max_replicas ({bounds.max_replicas})")
        if bounds.target_ongoing_requests <= 0 or bounds.upscale_delay_s < 0 or bounds.downscale_delay_s < 0:
            raise BoundsError("labels: target_ongoing_requests must be > 0 and the delays >= 0")
        return bounds


@dataclass(frozen=True)
class Observation:
    """One look at a service: its replicas as asked for, and the load each running replica reported."""

    replicas: int  # what the service asks Swarm for
    loads: tuple[int, ...]  # requests in progress (running + waiting), per replica that answered
    unreachable: int = 0  # running replicas that did not report
    updating: bool = False  # a rolling update (or its rollback) is under way

    @property
    def ongoing(self) -> int:
        return sum(self.loads)


@dataclass(frozen=True)
class Decision:
    action: Literal["scale", "wait", "hold"]
    replicas: int  # what the service has now
    target: int  # what it should have (== replicas unless action == "scale" or "wait")
    reason: str

    def describe(self, service: str) -> str:
        if self.action == "scale":
            return f"{service}: scale {self.replicas} -> {self.target}: {self.reason}"
        if self.action == "wait":
            return f"{service}: wants {self.target} (has {self.replicas}): {self.reason}"
        return f"{service}: keep {self.replicas}: {self.reason}"


class ServicePolicy:
    """The decisions for one service, remembering since when its current wish has held."""

    def __init__(self) -> None:
        self._wish: int | None = None  # +1: more replicas, -1: fewer
        self._wished_since = 0.0

    def decide(self, bounds: Bounds, seen: Observation, now: float) -> Decision:
        replicas = seen.replicas
        if seen.updating:
            self._wish = None
            return Decision("hold", replicas, replicas, "a rolling update is under way")
        if replicas < bounds.min_replicas or replicas > bounds.max_replicas:
            self._wish = None
            target = min(max(replicas, bounds.min_replicas), bounds.max_replicas)
            which = "min_replicas" if replicas < bounds.min_replicas else "max_replicas"
            return Decision("scale", replicas, target, f"outside the bounds ({which} is {getattr(bounds, which)})")
        if not seen.loads:
            self._wish = None
            return Decision("hold", replicas, replicas, f"no replica reported its load ({seen.unreachable} did not answer)")
        load = self._load_text(bounds, seen)
        wanted = math.ceil(seen.ongoing / bounds.target_ongoing_requests)
        target = min(max(wanted, bounds.min_replicas), bounds.max_replicas)
        if target == replicas:
            self._wish = None
            return Decision("hold", replicas, replicas, load)
        direction = 1 if target > replicas else -1
        if self._wish != direction:
            self._wish, self._wished_since = direction, now
        delay_name = "upscale_delay_s" if direction > 0 else "downscale_delay_s"
        delay = getattr(bounds, delay_name)
        held = now - self._wished_since
        if held >= delay:
            self._wish = None
            return Decision("scale", replicas, target, f"{load}; wanted for {held:.0f}s (>= {delay_name} {delay:g})")
        return Decision("wait", replicas, target, f"{load}; wanted for {held:.0f}s of {delay_name} {delay:g}")

    @staticmethod
    def _load_text(bounds: Bounds, seen: Observation) -> str:
        text = f"{seen.ongoing} request(s) in progress on {len(seen.loads)} replica(s), target {bounds.target_ongoing_requests:g} per replica"
        if seen.unreachable:
            text += f", {seen.unreachable} replica(s) not reporting"
        return text
