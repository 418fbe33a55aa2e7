"""The `parley` command line: one function per command, and the only module that prints.

The work lives in plain modules that return data or raise typed errors (parley.llms, generate,
checks, up, stack, engine, docs, chat); a command calls them, prints what they return or report
through a callback, and turns their errors into ClickException here only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from parley.cards import CardError
from parley.kinds import llm_apis
from parley.progress import Progress
from parley.repo import Repo, RepoError
from parley.autoscaler_overlay import AUTOSCALER_OVERLAY
from parley.stack import DEFAULT_PROJECT, StackError, StackOptions, make_stack, push_images, stack_header
from parley.tools import ToolError
from parley.memory import available_memory
from parley.up import RunningDistribution, SupervisorOutput, UpError, check_memory, plan_distribution, run_services
from parley.yamlio import YamlSyntaxError

DEFAULT_DIST = "universal_prompted_assistant"
# The `api` of each registered LLM kind (parley/kinds/llm.py), for add-llm's --api.
LLM_APIS = llm_apis()
# What `parley up` prints once every service is healthy (tests and scripts wait for these lines).
READY_LINE = "PARLEY_READY"
SERVICE_LINE = "PARLEY_SERVICE"


def _repo(path: str | None) -> Repo:
    try:
        return Repo(Path(path).resolve()) if path else Repo.find()
    except RepoError as error:
        raise click.ClickException(str(error)) from None


def _fail(error: Exception) -> click.ClickException:
    if isinstance(error, CardError):
        return click.ClickException("invalid cards (fix them, then run the command again):\n" + "\n".join(error.problems))
    return click.ClickException(str(error))


repo_option = click.option(
    "--repo", "repo_path", default=None, metavar="DIR", help="The Parley checkout to work on (default: the one holding the working directory)."
)


@click.group(
    epilog="""\b
Examples:
  parley add-llm transformers-lm-qwen --model Qwen/Qwen2.5-0.5B-Instruct
  parley add-llm --scan ./models
  parley remove-llm transformers-lm-qwen
  parley add-skill travel-prompted-skill --prompt-file travel.json --llm transformers-lm-smollm2
  parley remove-skill travel-prompted-skill
  parley new-dist travel_assistant --skills travel-prompted-skill
  parley add-component travel-prompted-skill --dist universal_prompted_assistant
  parley list
  parley generate --dry-run
  parley check
  parley up universal_prompted_assistant
  parley stack universal_prompted_assistant --overlay cpu.yml -o stack.yml
  parley export universal_prompted_assistant --overlay cpu.yml -o parley-bundle.tar
  parley import parley-bundle.tar
  parley chat http://127.0.0.1:4242
  parley secrets init
  sudo parley engine start
  parley docs
"""
)
@click.version_option(package_name="parley")
def cli() -> None:
    """Maintain and run Parley distributions.

    Every component has a card in components/; `parley` generates the rest of a distribution's
    wiring from the cards, checks that it is consistent, and runs a distribution without Docker.
    """


def _report_plan(plan, dry_run: bool, what: str) -> list[str]:
    """Print the diff (dry run) or write the plan and list what it wrote; the paths written."""
    if dry_run:
        diff = plan.diff()
        click.echo(diff if diff else f"nothing to change: {what} is already in place", nl=not diff)
        return []
    written = plan.apply()
    for relative in written:
        click.echo(f"{'removed' if plan.files[relative] is None else 'wrote'} {relative}")
    if not written:
        click.echo(f"nothing to change: {what} is already in place")
    return written


@click.command(name="add-llm")
@click.argument("name", required=False)
@click.option("--scan", "scan", type=click.Path(file_okay=False, path_type=Path), help="Add every .gguf file and model folder under this folder that no card serves yet, each as transformers-lm-<its name> (instead of NAME and --model).")
@click.option("--model", "model", metavar="SOURCE", help="Embedded name (smollm2-135m-instruct), local directory, .gguf file or Hugging Face id; with --api openai, the upstream's model name.")
@click.option("--api", type=click.Choice(LLM_APIS), default=None, help="Serve the model here (transformers) or forward to an OpenAI-compatible upstream (openai); default: the card's, else transformers.")
@click.option("--base-url", metavar="URL", help="With --api openai: the upstream's OpenAI API root, e.g. https://api.openai.com/v1.")
@click.option("--key-env", "key_env", metavar="VAR", multiple=True, help="Env var holding an API key this LLM may receive, named *_API_KEY, *_KEY, *_TOKEN or the like (repeatable); never the key itself.")
@click.option("--port", type=int, help="The service's port (1024-65535, unique); default: the first free one from 8180.")
@click.option("--dist", "dists", metavar="DIST", multiple=True, help="Distribution to add it to (repeatable); default: those that have it already, else all.")
@click.option("--half-precision/--full-precision", default=None, help="Load the weights in half precision (GPU).")
@click.option("--context-length", type=int, help="Tokens per sequence to serve (CONTEXT_LENGTH), at most the model's window; default: the registry's, else the window up to 4096.")
@click.option("--sha256", metavar="HEX", help="Expected sha256 of the model file; refused if it does not match (the card pins the file's sha256 either way).")
@click.option("--ram-usage", metavar="SIZE", help="Memory limit of the container, e.g. 2G; default: the estimate (weights + KV cache + runtime); refused below it.")
@click.option("--gpu-usage", metavar="SIZE", help="GPU memory the model needs, e.g. 4G (for MODELS.md and the card).")
@click.option("--license", "license_", metavar="SPDX", help="The model's license, e.g. Apache-2.0.")
@click.option("--description", metavar="TEXT", help="One line for MODELS.md and the card.")
@click.option("--alias", "aliases", metavar="NAME", multiple=True, help="Another name the model answers to in /v1/models (repeatable).")
@click.option("--stop", "stop", metavar="TEXT", multiple=True, help="A stop sequence of the model (repeatable).")
@click.option("--from", "from_card", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Start from this card file (options given here override it).")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def add_llm(name, scan, model, api, base_url, key_env, port, dists, half_precision, context_length, sha256, ram_usage, gpu_usage, license_, description, aliases, stop, from_card, dry_run, repo_path) -> None:
    """Add an LLM (or update it): write its card and regenerate every file that mentions it.

    A model served here is read from its own files (chat template, end-of-generation tokens, window,
    size, dimensions) and recognised by its file's sha256 in models/known.yml, whose settings it then
    gets; it prints which values it had to guess. The card pins the file's sha256 and gets a
    ram_usage that holds the model's estimated memory need.

    \b
    Examples:
      parley add-llm transformers-lm-smollm2 --model smollm2-135m-instruct --port 8180
      parley add-llm transformers-lm-tiny --model ./models/tiny.gguf --dist universal_prompted_assistant
      parley add-llm --scan ./models
      parley add-llm openai-api-gpt4o-mini --api openai --base-url https://api.openai.com/v1 \\
          --model gpt-4o-mini --key-env OPENAI_API_KEY

    Running it twice changes nothing the second time.
    """
    from parley.llms import LlmError, LlmOptions, plan_add_llms, scan_options

    options = LlmOptions(
        name=name or "", model=model, api=api, base_url=base_url, key_env=list(key_env), port=port, dists=list(dists),
        half_precision=half_precision, context_length=context_length, sha256=sha256, ram_usage=ram_usage,
        gpu_usage=gpu_usage, license=license_, description=description, aliases=list(aliases), stop=list(stop),
        from_card=from_card,
    )
    repo = _repo(repo_path)
    try:
        if scan is not None:
            if name or model or from_card:
                raise LlmError("--scan names each card after its file: drop NAME, --model and --from")
            options_list, skipped = scan_options(repo, scan, options)
        elif not name:
            raise LlmError("give the LLM's NAME (a card name such as transformers-lm-qwen), or --scan DIR")
        else:
            options_list, skipped = [options], []
        added = plan_add_llms(repo, options_list, skipped)
    except (LlmError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    for line in added.skipped:
        click.echo(f"skipped {line}", err=True)
    for built in added.built:
        for note in built.notes:
            click.echo(f"{built.card.name}: {note}", err=True)
    if _report_plan(added.plan, dry_run, ", ".join(b.card.name for b in added.built) or "nothing"):
        for built in added.built:
            click.echo(f"next: `parley check`, then `parley up` to try {built.card.name} (its URL: http://127.0.0.1:{built.card.port})", err=True)


@click.command(name="remove-llm")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def remove_llm(name, dry_run, repo_path) -> None:
    """Remove an LLM: its card and everything generated from it.

    \b
    Example:
      parley remove-llm transformers-lm-tiny
    """
    from parley.llms import LlmError, plan_remove_llm

    repo = _repo(repo_path)
    try:
        plan = plan_remove_llm(repo, name)
    except (LlmError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    _report_plan(plan, dry_run, name)


@click.command(name="add-skill")
@click.argument("name")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json", help="Dream's prompt file, {\"prompt\": ..., \"goals\": ...}: used in place under common/prompts/, else copied there as NAME.json, as it is.")
@click.option("--llm", metavar="LLM_CARD", help="The card name of the LLM it asks when a turn names none, e.g. transformers-lm-smollm2.")
@click.option("--dist", "dists", metavar="DIST", multiple=True, help="Distribution to add it to (repeatable); default: those that have it already, else all.")
@click.option("--goals", metavar="TEXT", help="What the skill is for, for the agent's skill selection; default: the prompt file's goals (else its prompt).")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json", help="A generative config it sends its LLM (Dream's GENERATIVE_SERVICE_CONFIG); default: the LLM's own.")
@click.option("--send-env", "send_env", metavar="VAR", multiple=True, help="An env var whose value the skill may send its LLM, e.g. OPENAI_API_KEY (repeatable; Dream's ENVVARS_TO_SEND).")
@click.option("--port", type=int, help="The skill's port (1024-65535, unique); default: the first free one from 8147.")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def add_skill(name, prompt_file, llm, dists, goals, config, send_env, port, dry_run, repo_path) -> None:
    """Add a prompted skill (or update it): one more instance of the one skill image, a prompt and an LLM.

    It writes the skill's card and everything generated from it: its compose service, dev.yml
    entry, components.tsv, service_configs, its entry in each distribution's pipeline_conf.json
    and the agent's WAIT_HOSTS. Running it twice changes nothing the second time; `parley
    remove-skill` undoes it.

    \b
    Example:
      parley add-skill fairytale-prompted-skill --prompt-file common/prompts/fairytales.json \\
          --llm transformers-lm-smollm2 --dist multiskill_assistant
    """
    from parley.skills import SkillError, SkillOptions, plan_add_skill

    options = SkillOptions(name=name, prompt_file=prompt_file, llm=llm, dists=list(dists), goals=goals, config=config,
                           send_env=list(send_env), port=port)
    repo = _repo(repo_path)
    try:
        card, plan = plan_add_skill(repo, options)
    except (SkillError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    if _report_plan(plan, dry_run, name):
        click.echo(f"next: `parley check`, then `parley up DIST` (its turns are answered as {card.pipeline_name})", err=True)


@click.command(name="remove-skill")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def remove_skill(name, dry_run, repo_path) -> None:
    """Remove a prompted skill: its card, everything generated from it and the files it copied in.

    \b
    Example:
      parley remove-skill fairytale-prompted-skill
    """
    from parley.skills import SkillError, plan_remove_skill

    repo = _repo(repo_path)
    try:
        plan = plan_remove_skill(repo, name)
    except (SkillError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    _report_plan(plan, dry_run, name)


@click.command(name="new-dist")
@click.argument("name")
@click.option("--from", "from_dist", metavar="DIST", help="Start from a copy of this distribution (its hand-written parts too).")
@click.option("--skills", "skills", metavar="A,B", multiple=True, help="The skills it runs (card names, comma-separated); default: --from's, else none.")
@click.option("--llms", "llms", metavar="X,Y", multiple=True, help="The LLMs it runs besides those its skills ask (card names, comma-separated); default: --from's.")
@click.option("--language", type=click.Choice(["EN", "RU"], case_sensitive=False), help="The agent's LANGUAGE and its special answers' language; default: --from's, else EN.")
@click.option("--description", metavar="TEXT", help="One line for the pipeline's metadata.")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would write; write nothing.")
@repo_option
def new_dist(name, from_dist, skills, llms, language, description, dry_run, repo_path) -> None:
    """Make a distribution: its override, its overlays (dev, cpu, proxy, postgres, autoscaler, monitoring) and pipeline_conf.json.

    Fresh, it has the agent, the skills and LLMs named, and Dream's pipeline with the
    description-based skill selector (each turn to the skill whose goals fit it) and the
    confidence response selector; with --from it is a copy of another distribution. Everything
    the components need is generated from their cards, so `parley up NAME`, `docker compose`
    and `parley stack NAME` run it at once.

    \b
    Examples:
      parley new-dist travel_assistant --skills travel-prompted-skill --llms transformers-lm-smollm2
      parley new-dist universal_ru_prompted_assistant --from universal_prompted_assistant --language RU
    """
    from parley.dists import DistError, NewDistOptions, plan_new_dist

    options = NewDistOptions(name=name, from_dist=from_dist, skills=list(skills) if skills else None,
                             llms=list(llms) if llms else None, language=language, description=description)
    repo = _repo(repo_path)
    try:
        plan = plan_new_dist(repo, options)
    except (DistError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    if _report_plan(plan, dry_run, name):
        click.echo(f"next: `parley check`, then `parley up {name}`", err=True)


@click.command(name="add-component")
@click.argument("card")
@click.option("--dist", "dists", metavar="DIST", multiple=True, help="Distribution to add it to (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def add_component(card, dists, dry_run, repo_path) -> None:
    """Add a component that has a card to another distribution (with the LLM a skill asks).

    \b
    Example:
      parley add-component travel-prompted-skill --dist universal_prompted_assistant
    """
    from parley.dists import DistError, plan_add_component

    repo = _repo(repo_path)
    try:
        plan = plan_add_component(repo, card, list(dists))
    except (DistError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    _report_plan(plan, dry_run, f"{card} in {', '.join(dists)}")


@click.command(name="generate")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def generate(dry_run, repo_path) -> None:
    """Regenerate every file derived from the cards (after editing a card by hand).

    \b
    Example:
      parley generate --dry-run
    """
    from parley.generate import plan_generation

    repo = _repo(repo_path)
    try:
        plan = plan_generation(repo, repo.load_valid_cards())
    except (CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    _report_plan(plan, dry_run, "every generated file")


@click.command(name="check")
@click.option("--no-tools", is_flag=True, help="Skip the external validators (compose, hadolint, docker stack config).")
@click.option("--live", "live_url", metavar="URL", help="Instead of the bundle, check a running OpenAI-compatible server at this base URL (e.g. http://127.0.0.1:8180/v1) against OpenAI's contract.")
@click.option("--model", "live_model", metavar="NAME", help="With --live: the model to ask (default: the first one GET /models lists).")
@click.option("--api-key", "live_api_key", metavar="KEY", envvar="PARLEY_LIVE_API_KEY", help="With --live: sent as a Bearer token (or set PARLEY_LIVE_API_KEY); never printed.")
@click.option("--timeout", "live_timeout", type=float, default=300.0, show_default=True, help="With --live: seconds one request may take.")
@repo_option
def check(no_tools, live_url, live_model, live_api_key, live_timeout, repo_path) -> None:
    """Verify the whole bundle; print one line per problem ("file: where: what") and exit 1 if any.

    Cards, ports, components.tsv, services vs cards, WAIT_HOSTS, env files and build contexts, every
    generated file, generative configs; then the Compose validator on every overlay combination,
    hadolint on every Dockerfile and `docker stack config` where the docker CLI is installed.

    With --live URL it checks a running server instead: models, chat, completions, streaming,
    usage, finish reasons, structured output, tool calls (streamed too) and OpenAI's error shapes,
    one line per case (PASS/FAIL and why); exit 0 only when every case passes.

    \b
    Examples:
      parley check
      parley check --live http://127.0.0.1:8180/v1
      parley check --live http://127.0.0.1:8080/v1 --model smollm2 --api-key sk-...
    """
    if live_url:
        _check_live(live_url, live_model, live_api_key, live_timeout)
        return
    from parley.checks import run_checks

    report = run_checks(_repo(repo_path), tools=not no_tools)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for problem in report.problems:
        click.echo(problem)
    if report.problems:
        click.echo(f"{len(report.problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo("ok: the bundle is consistent", err=True)


def _check_live(url: str, model: str | None, api_key: str | None, timeout: float) -> None:
    from parley.live_check import CASES, run_live_check

    click.echo(f"checking {url} against OpenAI's contract: {len(CASES)} cases", err=True)
    results = run_live_check(url, model, api_key, timeout, on_result=lambda result: click.echo(result.line()))
    failed = [result for result in results if not result.passed]
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed", err=True)
    if failed:
        sys.exit(1)


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with every field of every LLM (full sha256, sizes in bytes, the estimate's parts).")
@click.option("--dist", "dist", metavar="DIST", help="Only the LLMs of this distribution.")
@repo_option
def list_(as_json, dist, repo_path) -> None:
    """List the bundle's LLMs: name, kind, source, sha256, backend, quantisation, context, memory, port, distributions, names.

    Read from the cards alone (the memory estimate from what `add-llm` read from each model).

    \b
    Examples:
      parley list
      parley list --dist universal_prompted_assistant --json
    """
    import json

    from parley.listing import ListError, format_table, list_llms

    try:
        rows = list_llms(_repo(repo_path), dist)
    except (ListError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    if as_json:
        click.echo(json.dumps([row.to_json() for row in rows], indent=2))
    else:
        click.echo(format_table(rows), nl=False)


@click.command(name="up")
@click.argument("dist", default=DEFAULT_DIST)
@click.option("--free-ports", is_flag=True, help="Give every service a free port instead of its own (for tests and side-by-side runs).")
@click.option("--overlay", "overlays", metavar="FILE", multiple=True, help="Overlay of the distribution to apply over its override (repeatable); default: cpu.yml where the distribution has one.")
@click.option("--timeout", "startup_timeout", type=float, default=600.0, show_default=True, help="Seconds each service may take to become healthy.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="Where volumes and rewritten files live (default: .cache/parley-up/DIST).")
@click.option("--skip-memory-check", is_flag=True, help="Start even when the services' memory limits add up to more than this machine has available.")
@click.option("--monitoring", is_flag=True, help="Also run Prometheus (the monitoring.yml overlay, on Debian's `prometheus` binary) scraping every service's /metrics.")
@repo_option
def up(dist, free_ports, overlays, startup_timeout, state_dir, skip_memory_check, monitoring, repo_path) -> None:
    """Run a distribution on this machine without Docker, from its compose files.

    Each service runs its Dockerfile's CMD (or its compose `command`) from its folder of the
    checkout with the checkout's .venv, its environment and env files (.env_secret's API keys
    among them); hostnames in URLs become 127.0.0.1. Services start in dependency order, each
    waited for on its health check. Ctrl-C stops them all. Once all are healthy it prints a
    `PARLEY_SERVICE name url` line per service and `PARLEY_READY`.

    \b
    Examples:
      parley up
      parley up universal_prompted_assistant --free-ports
      parley up --monitoring
    """
    def interrupt(signum, frame):  # SIGTERM stops everything, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started us with it ignored
    repo = _repo(repo_path)
    try:
        plans = plan_distribution(repo, dist, overlays=list(overlays) or None, free_ports=free_ports, state_dir=state_dir,
                                  monitoring=monitoring)
        if not skip_memory_check:
            check_memory(dist, plans, available_memory())
        output = _UpOutput([plan.name for plan in plans])
        with run_services(dist, plans, startup_timeout=startup_timeout, output=output) as running:
            _show_how_to_talk_to_the_agent(running, output)
            running.watch()
    except UpError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        click.echo("parley up: stopped every service", err=True)


class _UpOutput(SupervisorOutput):
    """`parley up`'s terminal: each service's lines as `name | line` on stdout (coloured on a
    terminal), the supervisor's notes on stderr, the ready lines on stdout."""

    COLORS = ("cyan", "green", "yellow", "magenta", "blue", "red")

    def __init__(self, names: list[str]):
        width = max((len(name) for name in names), default=0)
        colored = sys.stdout.isatty()
        self.lock = threading.Lock()
        self.prefixes = {
            name: click.style(f"{name:<{width}} |", fg=self.COLORS[index % len(self.COLORS)]) if colored else f"{name:<{width}} |"
            for index, name in enumerate(names)
        }

    def service_line(self, name: str, line: str) -> None:
        with self.lock:  # one thread per service writes here
            sys.stdout.write(f"{self.prefixes[name]} {line}\n")
            sys.stdout.flush()

    def note(self, text: str) -> None:
        sys.stderr.write(f"parley up: {text}\n")
        sys.stderr.flush()

    def ready(self, running: RunningDistribution) -> None:
        for name, url in running.urls.items():
            print(f"{SERVICE_LINE} {name} {url}", flush=True)
        print(READY_LINE, flush=True)


def _show_how_to_talk_to_the_agent(running: RunningDistribution, output: _UpOutput) -> None:
    agent = running.services.get("agent")
    if agent is None:
        return
    url = agent.plan.url
    has_keys = bool(agent.plan.env.get("PARLEY_API_KEYS") or agent.plan.env.get("PARLEY_API_KEYS_FILE"))
    output.note(f"the agent answers on {url}; try:")
    # The key is not printed: the command reads it from .env_secret when it runs.
    installed = Path(sys.executable).parent / "parley"
    parley = str(installed) if installed.is_file() else "parley"
    key_header = f" -H \"Authorization: Bearer $({parley} secrets show)\"" if has_keys else ""
    print(
        f"  curl -s -X POST {url}/ -H 'Content-Type: application/json'{key_header} "
        "-d '{\"user_id\": \"me\", \"payload\": \"What is the capital of France?\"}'",
        flush=True,
    )
    output.note(f"or chat in the terminal: parley chat {url}  (Ctrl-C stops everything)")
    output.note(f"or in the browser, the chat page: {url}/" + (f"  (it asks for the key: `{parley} secrets show`)" if has_keys else ""))
    prometheus = running.services.get("prometheus")
    if prometheus is not None:
        output.note(f"Prometheus scrapes every service's /metrics: {prometheus.plan.url}/targets")


@click.command(name="chat")
@click.argument("url", default="http://127.0.0.1:4242")
@click.option("--user-id", default=None, help="The user id to talk as (default: a new one per session).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each answer.")
@click.option("--api-key-env", default="PARLEY_API_KEY", show_default=True, metavar="VAR", help="The env var holding the agent's API key; unset, the first key of the checkout's .env_secret, if any.")
def chat(url, user_id, timeout, api_key_env) -> None:
    """Chat with an agent in the terminal (an empty line or Ctrl-D ends it).

    \b
    Example:
      parley chat http://127.0.0.1:4242
    """
    from parley.api_keys import read_keys
    from parley.chat import ChatError, new_user_id, send_turn

    api_key = os.environ.get(api_key_env, "").strip() or None
    if api_key is None:
        with contextlib.suppress(RepoError):
            api_key = next(iter(read_keys(Repo.find().root)), None)
    user_id = user_id or new_user_id()
    click.echo(f"chatting with {url} as {user_id}; an empty line or Ctrl-D ends it", err=True)
    while True:
        try:
            text = click.prompt("you", default="", show_default=False, prompt_suffix="> ")
        except (EOFError, click.Abort):
            click.echo("", err=True)
            return
        if not text.strip():
            return
        try:
            answer = send_turn(url, user_id, text, timeout, api_key=api_key)
        except ChatError as error:
            raise click.ClickException(str(error)) from None
        skill = answer.get("active_skill")
        click.echo(f"bot> {answer.get('response', '')}" + (click.style(f"  [{skill}]", dim=True) if skill else ""))


@click.command(name="docs")
@click.option("--check", "check_only", is_flag=True, help="Exit 1 if README.md's command reference is out of date or a help text lacks an example or option help; write nothing.")
@repo_option
def docs(check_only, repo_path) -> None:
    """Paste every command's --help into README.md (between the parley-help markers).

    Subcommands too. It also checks the help texts: each command shows an example of itself, each
    option has help, and `parley --help` shows an example of every command.

    \b
    Example:
      parley docs --check
    """
    from parley.docs import help_problems, update_readme

    repo = _repo(repo_path)
    changed = update_readme(repo.path("README.md"), cli, write=not check_only)
    problems = help_problems(cli)
    for problem in problems:
        click.echo(problem)
    if check_only and changed:
        raise click.ClickException("README.md's command reference is out of date: run `parley docs`")
    if problems:
        raise click.ClickException(f"{len(problems)} help text problem(s)")
    click.echo("README.md " + ("updated" if changed else "is up to date"), err=True)


@click.command(name="stack")
@click.argument("dist")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the stack file here (default: print it).")
@click.option("--overlay", "overlays", metavar="FILE", multiple=True, help="Overlay of the distribution to apply over its override (repeatable), e.g. cpu.yml; dev.yml does not travel to a swarm.")
@click.option("--endpoint-mode", type=click.Choice(["vip", "dnsrr"]), default="vip", show_default=True, help="How a service name reaches its replicas: a virtual IP (needs IPVS in the kernel) or DNS round robin with the agent's port published on its node (mode: host).")
@click.option("--project", default=DEFAULT_PROJECT, show_default=True, help="The compose project whose built images the stack runs (PROJECT-SERVICE, as `docker compose -p PROJECT build` names them).")
@click.option("--push", "registry", metavar="REGISTRY", help="Tag the built images as REGISTRY/PROJECT-SERVICE, push them and run those (every node pulls them); without it, the stack runs the local images (one node).")
@repo_option
def stack(dist, output, overlays, endpoint_mode, project, registry, repo_path) -> None:
    """Write a Docker Swarm stack file for a distribution, from its compose files and cards.

    Each service gets a deploy section from its card: replicas and placement (the card's
    optional `deploy:`), memory limits and reservations, a restart policy and rolling updates
    (start-first, except for a service that keeps state in a volume: it runs once on the node
    labelled parley-state=true). The agent keeps SQLite state there and runs once, unless the
    postgres.yml overlay gives it a shared database: then it runs its card's replicas anywhere.
    An LLM whose card has deploy.autoscaling starts its initial_replicas, and the stack gets the
    autoscaler (the distribution's autoscaler.yml, applied without being asked for), which scales
    it by load. Build the images first; see the README's "Beyond one machine".

    \b
    Example:
        docker compose -p parley -f docker-compose.yml -f assistant_dists/universal_prompted_assistant/docker-compose.override.yml -f assistant_dists/universal_prompted_assistant/cpu.yml build
        parley stack universal_prompted_assistant --overlay cpu.yml -o stack.yml
        parley stack universal_prompted_assistant --overlay cpu.yml --overlay postgres.yml -o stack.yml
        docker stack deploy --resolve-image never -c stack.yml parley
    """
    from parley.yamlio import dump_yaml

    options = StackOptions(dist, tuple(overlays), endpoint_mode, project, registry)
    repo = _repo(repo_path)
    try:
        built = make_stack(repo, options)
        if registry:
            push_images(built.images, click.echo)
    except (CardError, StackError, ToolError) as error:
        raise _fail(error) from None
    text = stack_header(options) + dump_yaml(built.document)
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text)
    services = built.document["services"]
    replicas = ", ".join(f"{name} x{spec['deploy']['replicas']}" for name, spec in services.items())
    click.echo(f"wrote {output}: {len(services)} services ({replicas})", err=True)
    if built.autoscaled:
        click.echo(f"the autoscaler scales {', '.join(built.autoscaled)} by load ({AUTOSCALER_OVERLAY} applied)", err=True)
    if "secrets" in built.document:
        click.echo("the services read their API keys from the Docker secret parley_api_keys: create it once with "
                   "`parley secrets show | docker secret create parley_api_keys -`", err=True)
    if not registry:
        click.echo(f"it runs the local images {', '.join(built.images)}: build them with docker compose -p {project} {' '.join('-f ' + f for f in built.compose_files)} build", err=True)


@click.command(name="export")
@click.argument("dist")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The bundle file to write (a tar).")
@click.option("--overlay", "overlays", metavar="FILE", multiple=True, help="Overlay of the distribution to apply over its override (repeatable), e.g. cpu.yml or postgres.yml; dev.yml does not travel.")
@click.option("--project", default=DEFAULT_PROJECT, show_default=True, help="The compose project whose built images the bundle carries (PROJECT-SERVICE, as `docker compose -p PROJECT build` names them); also the project `import` runs it as.")
@repo_option
def export(dist, output, overlays, project, repo_path) -> None:
    """Pack a distribution for a machine without internet: images, model files, cards, checksums.

    The images must be built first (with the same --project and overlays). The bundle holds them
    (`docker save`), the model files its LLM services mount, its cards and .env, a compose.yml that
    runs the images as they are, and manifest.json with each file's sha256. Carry it over and run
    `parley import` there.

    \b
    Example:
        docker compose -p parley -f docker-compose.yml -f assistant_dists/universal_prompted_assistant/docker-compose.override.yml -f assistant_dists/universal_prompted_assistant/cpu.yml build
        parley export universal_prompted_assistant --overlay cpu.yml -o parley-bundle.tar
    """
    from parley.bundle import BundleError, export_distribution, size_text

    repo = _repo(repo_path)
    try:
        manifest = export_distribution(repo, dist, output, tuple(overlays), project, click.echo)
    except (CardError, BundleError, ToolError) as error:
        raise _fail(error) from None
    click.echo(f"wrote {output} ({size_text(output.stat().st_size)}): {len(manifest.images)} images, {len(manifest.files)} files with their sha256")
    click.echo(f"next, on the other machine: parley import {output.name}")


@click.command(name="import")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-d", "--directory", type=click.Path(file_okay=False, path_type=Path), help="Where to unpack it (default: a folder named after the bundle, beside it).")
def import_(bundle, directory) -> None:
    """Verify a bundle from `parley export`, load its images, and print the command that runs it.

    Every file's sha256 is checked against the manifest first: a file that does not match is named
    and nothing is loaded. Needs only a Docker engine (with the compose plugin to run it).

    \b
    Example:
        parley import parley-bundle.tar
    """
    from parley.bundle import BundleError, docker_load, import_bundle

    folder = directory or bundle.with_suffix("")
    try:
        imported = import_bundle(bundle, folder, lambda path: docker_load(path, click.echo), click.echo)
    except BundleError as error:
        raise _fail(error) from None
    click.echo(f"imported {imported.manifest.dist}: {len(imported.manifest.files)} files verified, "
               f"{len(imported.loaded)} images loaded, in {imported.folder}")
    click.echo("run it with:")
    click.echo(f"  {imported.command}")


@click.group(name="engine")
def engine() -> None:
    """Run a Docker engine of Parley's own on a machine that has none (needs root).

    \b
    Example:
        sudo parley engine start && set -a && . .cache/parley-engine.env && set +a
        docker compose -f docker-compose.yml ... up --build
        sudo parley engine stop
    """


class _StepPrinter(Progress):
    """Each step as `==> title`, what it found indented under it, then how long it took."""

    def begin(self, title: str) -> None:
        click.echo(f"==> {title}")

    def say(self, line: str) -> None:
        click.echo(f"    {line}")

    def end(self, title: str, seconds: float, *, failed: bool) -> None:
        if failed:
            click.echo(f"    failed after {seconds:.1f}s", err=True)
        else:
            click.echo(f"    done in {seconds:.1f}s")


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        # sudo's PATH may lack the virtualenv's bin folder: name this parley by its path
        installed = Path(sys.executable).parent / "parley"
        parley = str(installed) if installed.is_file() else "parley"
        raise click.ClickException(
            f"parley engine {action} must run as root: it installs packages, starts dockerd and changes "
            f"the network. Run: sudo {parley} engine {action}"
        )


@engine.command(name="start")
def engine_start() -> None:
    """Install what is missing, start dockerd and prepare image builds (idempotent).

    \b
    Example:
        sudo parley engine start
    """
    from parley.engine import DockerEngineError, EngineLayout, start_engine

    _require_root("start")
    layout = EngineLayout()
    started = time.monotonic()
    try:
        start_engine(layout, _StepPrinter())
    except (DockerEngineError, ToolError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"engine ready in {time.monotonic() - started:.1f}s; for compose: set -a; . {layout.env_file}; set +a")


@engine.command(name="status")
def engine_status() -> None:
    """Say whether an engine answers, whether parley started it, and what it has.

    \b
    Example:
        parley engine status
    """
    from parley.engine import EngineLayout, engine_status

    status = engine_status(EngineLayout())
    pid = status.our_pid
    if status.running:
        click.echo(f"engine: running ({f'started by parley engine, pid {pid}' if pid else 'not started by parley engine'})")
        click.echo(f"local base image {status.local_base_image}: {'present' if status.local_base_image_present else 'absent'}")
    else:
        click.echo("engine: not running" + (f" (dockerd pid {pid} does not answer)" if pid else ""))
    click.echo(f"data root: {status.data_root} ({'present' if status.data_root_present else 'absent'})")
    click.echo(f"compose plugin: {status.compose_plugin or 'not installed'}")
    if status.env_file:
        click.echo(f"env file: {status.env_file}")


@engine.command(name="stop")
def engine_stop() -> None:
    """Stop the dockerd that `start` started and remove its bridge, iptables chains and mounts.

    The data root (images, build cache) stays, so the next start reuses it.

    \b
    Example:
        sudo parley engine stop
    """
    from parley.engine import DockerEngineError, EngineLayout, stop_engine

    _require_root("stop")
    try:
        stop_engine(EngineLayout(), _StepPrinter())
    except (DockerEngineError, ToolError) as error:
        raise click.ClickException(str(error)) from None


@click.group(name="secrets")
def secrets_group() -> None:
    """The distribution's API keys on this machine (.env_secret, which the compose files read).

    \b
    Example:
      parley secrets init
    """


@secrets_group.command(name="init")
@click.option("--force", is_flag=True, help="Replace an existing .env_secret with a new key (clients using the old one are refused).")
@repo_option
def secrets_init(force, repo_path) -> None:
    """Write a random API key to .env_secret (git-ignored): every service then needs it.

    `docker compose` and `parley up` give it to every service (PARLEY_API_KEYS); for a swarm,
    make it a Docker secret: `parley secrets show | docker secret create parley_api_keys -`.

    \b
    Example:
      parley secrets init
    """
    from parley.api_keys import SecretsError, write_key_file

    repo = _repo(repo_path)
    try:
        path = write_key_file(repo.root, replace=force)
    except SecretsError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote a new API key to {path} (mode 600); show it with `parley secrets show`")


@secrets_group.command(name="show")
@repo_option
def secrets_show(repo_path) -> None:
    """Print the first API key of .env_secret (what a client sends as `Authorization: Bearer <key>`).

    \b
    Example:
      curl -H "Authorization: Bearer $(parley secrets show)" http://127.0.0.1:4242/metrics
    """
    from parley.api_keys import SecretsError, first_key

    try:
        click.echo(first_key(_repo(repo_path).root))
    except SecretsError as error:
        raise click.ClickException(str(error)) from None


# Each command is registered here, one line each.
cli.add_command(add_llm)
cli.add_command(remove_llm)
cli.add_command(add_skill)
cli.add_command(remove_skill)
cli.add_command(new_dist)
cli.add_command(add_component)
cli.add_command(generate)
cli.add_command(list_)
cli.add_command(check)
cli.add_command(up)
cli.add_command(chat)
cli.add_command(docs)
cli.add_command(engine)
cli.add_command(stack)
cli.add_command(export)
cli.add_command(import_)
cli.add_command(secrets_group)
