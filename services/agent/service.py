"""The agent's work: one user turn through the pipeline, then the turn stored.

Services run in dependency order (`previous_services`); every service whose dependencies are done
starts at once, HTTP ones concurrently on a thread pool. A service that fails or passes its
connector timeout is skipped and logged; the pipeline goes on without it. When no skill answered,
the last-chance service answers; when the whole turn passes RESPONSE_TIME_LIMIT, the timeout service.
Keys sent with the turn reach the skills in this turn's dialog only: they are never stored, never
logged, and scrubbed from anything a service gives back. Each HTTP call carries the agent's own API
key and the turn's `traceparent`; what a turn did is counted in the agent's metrics (AgentMetrics).
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import requests

from common import tracing
from common.metrics import AgentMetrics, ServiceMetrics
from services.agent import connectors, formatters
from services.agent.pipeline import Pipeline, PipelineService
from services.agent.protocol import TurnRequest, TurnResponse
from services.agent.settings import Settings
from services.agent.skill_selection import Selection
from services.agent.state_methods import STATE_METHODS
from services.agent.store import DialogStore, new_id, now

logger = logging.getLogger(__name__)
REDACTED = "[redacted]"
# Secrets this long are scrubbed wherever they appear in a text; shorter ones only as a whole value.
MIN_SUBSTRING_SECRET = 8
# The most utterances of a dialog that its turn's services see, the user's new one included: the one
# cut the agent makes (Dream's formatters cut too, with get_last_n_turns). The whole dialog is stored.
# A skill may send its LLM fewer (the prompted skill's N_UTTERANCES_CONTEXT), and an LLM drops the
# oldest ones that do not fit its window.
HISTORY_UTTERANCES = 20
# The answer when no skill answered and the pipeline has no last-chance service, in the agent's LANGUAGE.
FALLBACK_ANSWERS = {"EN": "Sorry, something went wrong inside.", "RU": "Извините, что-то пошло не так."}


def redact(value: Any, secrets: list[str]) -> Any:
    """`value` with every secret string replaced, however deep it sits.

    Values only: dict keys are field names (`text`, `hypotheses`, ...), and a short secret (a key of
    "e") replaced inside them broke the turn with a KeyError (found by schema fuzzing).
    """
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            if len(secret) >= MIN_SUBSTRING_SECRET:
                value = value.replace(secret, REDACTED)
            elif value == secret:  # a short "key" inside words would garble every text
                value = REDACTED
        return value
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


@dataclass
class Turn:
    """The dialog while one turn runs through the pipeline (Dream's dialog dict, plus this turn's keys)."""

    dialog: dict
    human_utterance: dict
    keys: dict[str, str] = field(repr=False)
    bot_utterance: dict | None = None
    selected_skills: set[str] | None = None
    human_attributes: dict = field(default_factory=dict)
    bot_attributes: dict = field(default_factory=dict)
    # The user's stored attributes are replaced by these (then human_attributes merged) instead of kept.
    human_attributes_reset_to: dict | None = None
    # Why each skill was asked (the skill selector's reasons), for the turn's debug output.
    selection_reasons: dict[str, str] = field(default_factory=dict)

    def reset_human_attributes(self, keep: tuple[str, ...] = ()) -> None:
        """Clear the user's attributes, but for the `keep` names (Dream keeps `disliked_skills` as a list)."""
        current = self.dialog["human"]["attributes"]
        kept = {name: current.get(name, []) for name in keep}
        self.dialog["human"]["attributes"] = dict(kept)
        self.human_attributes_reset_to = kept

    def view(self) -> dict:
        """What services see: the dialog with this turn's keys in the user's last utterance's attributes."""
        dialog = copy.deepcopy(self.dialog)  # services must not change the turn's state
        if self.keys:
            last = dialog["utterances"][-1]
            last["attributes"]["api_keys"] = dict(self.keys)
        dialog["human_utterances"] = [u for u in dialog["utterances"] if u["user"]["user_type"] == "human"]
        dialog["bot_utterances"] = [u for u in dialog["utterances"] if u["user"]["user_type"] == "bot"]
        return dialog

    def set_bot_utterance(self, text: str, active_skill: str, confidence: float, human_attributes: dict | None = None,
                          bot_attributes: dict | None = None, annotations: dict | None = None) -> None:
        self.bot_utterance = {
            "utt_id": new_id(),
            "text": text,
            "orig_text": None,
            "user": {"user_type": "bot"},
            "active_skill": active_skill,
            "confidence": confidence,
            "annotations": dict(annotations or {}),
            "attributes": {},
            "date_time": now(),
        }
        self.human_attributes.update(human_attributes or {})
        self.bot_attributes.update(bot_attributes or {})


@dataclass
class Outcome:
    ok: bool
    reason: str = ""


class Agent:
    """Runs turns; its pipeline, state store and HTTP session come through the constructor."""

    def __init__(self, settings: Settings, pipeline: Pipeline, store: DialogStore,
                 session: requests.Session | None = None, *, metrics: AgentMetrics | None = None,
                 outbound_headers: Callable[[], dict[str, str]] = dict):
        self.settings = settings
        self.pipeline = pipeline
        self.store = store
        self.metrics = metrics or AgentMetrics(ServiceMetrics())
        # The agent's key and the turn's traceparent, for each call to a service (read in the turn's thread).
        self.outbound_headers = outbound_headers
        self.session = session or requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=settings.service_threads)
        self.session.mount("http://", adapter)
        self.pool = ThreadPoolExecutor(max_workers=settings.service_threads, thread_name_prefix="agent-service")
        self._skill_names = [s.short_name for s in pipeline.services if s.group == "skills"]
        self._skill_goals = {s.short_name: s.goals for s in pipeline.services if s.group == "skills" and s.goals}

    def close_dialog(self, user_id: str) -> None:
        self.store.close_active_dialog(user_id)

    def handle_turn(self, request: TurnRequest) -> TurnResponse:
        started = time.monotonic()
        attributes, keys, found_secrets = request.split_attributes()
        secrets = sorted(set(found_secrets) | set(keys.values()), key=len, reverse=True)
        dialog = self.store.active_dialog(request.user_id, last_utterances=HISTORY_UTTERANCES - 1)
        human_utterance = {
            "utt_id": new_id(),
            "text": request.payload,
            "user": {"user_type": "human"},
            "annotations": {},
            "hypotheses": [],
            "attributes": attributes,
            "date_time": now(),
        }
        dialog["utterances"].append(human_utterance)
        turn = Turn(dialog=dialog, human_utterance=human_utterance, keys=keys)

        timed_out = self._run_pipeline(turn, secrets, deadline=started + self.settings.response_time_limit)
        if turn.bot_utterance is None:
            special = self.pipeline.timeout if timed_out else None
            for service in (special, self.pipeline.last_chance):
                if service is not None and turn.bot_utterance is None:
                    self._apply(turn, service, self._call_python(service, turn), secrets)
        if turn.bot_utterance is None:  # a pipeline without a last-chance service
            turn.set_bot_utterance(FALLBACK_ANSWERS[self.settings.language], "last_chance_service", 0.0)

        # Nothing a service gave back may carry a key into the state.
        human_utterance.update(redact({k: human_utterance[k] for k in ("annotations", "hypotheses")}, secrets))
        bot_utterance = redact(turn.bot_utterance, secrets)
        self.store.append_turn(
            dialog["dialog_id"], human_utterance, bot_utterance,
            redact(turn.human_attributes, secrets), redact(turn.bot_attributes, secrets),
            human_attributes_reset_to=turn.human_attributes_reset_to,
        )
        seconds = time.monotonic() - started
        self.metrics.turn_answered(bot_utterance["active_skill"], seconds)
        logger.info(
            "turn of user %s in dialog %s answered by %s in %.2fs",
            request.user_id, dialog["dialog_id"], bot_utterance["active_skill"], seconds,
        )
        return TurnResponse(
            dialog_id=dialog["dialog_id"],
            utt_id=bot_utterance["utt_id"],
            user_id=request.user_id,
            response=bot_utterance["text"],
            active_skill=bot_utterance["active_skill"],
            confidence=bot_utterance["confidence"],
            debug_output=[
                {"skill_name": h["skill_name"], "text": h["text"], "confidence": h["confidence"],
                 **({"selected_because": turn.selection_reasons[h["skill_name"]]}
                    if h["skill_name"] in turn.selection_reasons else {})}
                for h in human_utterance["hypotheses"]
            ],
        )

    def _run_pipeline(self, turn: Turn, secrets: list[str], deadline: float) -> bool:
        """Run every service once its previous services are done; True when the turn ran out of time."""
        pending = list(self.pipeline.services)
        outcomes: dict[str, Outcome] = {}
        running: dict[Future, tuple[PipelineService, float]] = {}
        while pending or running:
            for service in [s for s in pending if all(p in outcomes for p in s.previous_services)]:
                pending.remove(service)
                outcome = self._start(service, turn, outcomes, running, secrets)
                if outcome is not None:  # None: running; its outcome comes when it finishes
                    self._record(outcomes, service, outcome)
            if not running:
                if pending and not any(all(p in outcomes for p in s.previous_services) for s in pending):
                    raise RuntimeError("pipeline stalled: " + ", ".join(s.name for s in pending))
                continue
            current = time.monotonic()
            if current >= deadline:
                for future, (service, _) in running.items():
                    future.cancel()
                    logger.warning("%s skipped: the turn passed RESPONSE_TIME_LIMIT", service.name)
                    self._record(outcomes, service, Outcome(False, "turn time limit"))
                return True
            next_deadline = min([d for _, d in running.values()] + [deadline])
            finished, _ = wait(list(running), timeout=max(0.0, next_deadline - current), return_when=FIRST_COMPLETED)
            for future in finished:
                service, service_deadline = running.pop(future)
                outcome = self._finish(service, future, turn, secrets)
                if outcome.ok and service.group == "skills":
                    started = service_deadline - service.connector.timeout
                    self.metrics.skill_answered(service.short_name, time.monotonic() - started)
                self._record(outcomes, service, outcome)
            current = time.monotonic()
            for future, (service, service_deadline) in list(running.items()):
                if current >= service_deadline and not future.done():
                    running.pop(future)
                    future.cancel()
                    logger.warning("%s skipped: no answer within its timeout of %gs",
                                   service.name, service.connector.timeout)
                    self._record(outcomes, service, Outcome(False, "timeout"))
        return False

    def _record(self, outcomes: dict[str, Outcome], service: PipelineService, outcome: Outcome) -> None:
        """A service's outcome in this turn; a skill that was skipped (failed, timed out, not selected) is counted."""
        outcomes[service.name] = outcome
        if outcome.reason and service.group == "skills":
            self.metrics.service_skipped(service.short_name, outcome.reason)

    def _start(self, service: PipelineService, turn: Turn, outcomes: dict[str, Outcome],
               running: dict, secrets: list[str]) -> Outcome | None:
        failed = [p for p in service.required_previous_services if not outcomes[p].ok]
        if failed:
            logger.warning("%s skipped: required %s did not answer", service.name, ", ".join(failed))
            return Outcome(False, "required service failed")
        if service.group == "skills" and turn.selected_skills is not None \
                and service.short_name not in turn.selected_skills:
            return Outcome(True, "not selected")
        if service.connector.protocol == "python":
            try:
                self._apply(turn, service, self._call_python(service, turn), secrets)
            except Exception:
                logger.exception("%s failed; skipped", service.name)
                return Outcome(False, "failed")
            return Outcome(True)
        payload = formatters.dialog_formatter(service.dialog_formatter)(turn.view())
        future = tracing.submit_in_context(self.pool, connectors.call_http, self.session, service.connector.url,
                                           payload, service.connector.timeout, self.outbound_headers())
        running[future] = (service, time.monotonic() + service.connector.timeout)
        return None

    def _finish(self, service: PipelineService, future: Future, turn: Turn, secrets: list[str]) -> Outcome:
        try:
            raw = future.result()
            result = formatters.response_formatter(service.response_formatter)(raw)
            self._apply(turn, service, result, secrets)
        except connectors.ServiceCallError as error:
            logger.warning("%s skipped: %s", service.name, redact(str(error), secrets))
            return Outcome(False, "failed")
        except Exception as error:  # a malformed answer must not cost the user the turn
            logger.warning("%s skipped: its answer could not be used (%s: %s)",
                           service.name, type(error).__name__, redact(str(error), secrets)[:200])
            return Outcome(False, "bad answer")
        if service.group == "skills" and not result:
            logger.info("%s gave no hypothesis: %s", service.name, redact(str(raw), secrets)[:300])
        return Outcome(True)

    def _call_python(self, service: PipelineService, turn: Turn) -> Any:
        options = dict(service.connector.options)
        if service.is_selector:
            options.setdefault("skill_names", self._skill_names)
            options.setdefault("skill_goals", self._skill_goals)
            options.setdefault("language", self.settings.language)
        return connectors.python_connector(service.connector.class_name)(turn.view(), options)

    def _apply(self, turn: Turn, service: PipelineService, result: Any, secrets: list[str]) -> None:
        if service.is_selector and service.group == "skill_selectors":
            if isinstance(result, Selection):
                turn.selected_skills = set(result.skills) if result.skills is not None else None
                turn.selection_reasons.update(result.reasons)
                annotation = result.annotation()
                if annotation is not None:
                    turn.human_utterance["annotations"][service.short_name] = annotation
            else:  # a selector of Dream's kind: the names of the skills to ask (None or []: all)
                turn.selected_skills = set(result) if result else None
            return
        if service.state_manager_method:
            name = service.short_name if service.group else service.name
            STATE_METHODS[formatters.short_name(service.state_manager_method)](turn, name, redact(result, secrets))
