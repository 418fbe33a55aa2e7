"""The `parley` command line: one function per command; domain errors become ClickException here only."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from parley.bundle import export_command, import_command
from parley.cards import CardError
from parley.engine import engine
from parley.repo import Repo, RepoError
from parley.stack import stack
from parley.yamlio import YamlSyntaxError

DEFAULT_DIST = "universal_prompted_assistant"


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
  parley remove-llm transformers-lm-qwen
  parley generate --dry-run
  parley check
  parley up universal_prompted_assistant
  parley stack universal_prompted_assistant --overlay cpu.yml -o stack.yml
  parley export universal_prompted_assistant --overlay cpu.yml -o parley-bundle.tar
  parley import parley-bundle.tar
  parley chat http://127.0.0.1:4242
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
@click.argument("name")
@click.option("--model", "model", metavar="SOURCE", help="Embedded name (smollm2-135m-instruct), local directory, .gguf file or Hugging Face id; with --api openai, the upstream's model name.")
@click.option("--api", type=click.Choice(["transformers", "openai"]), default="transformers", show_default=True, help="Serve the model here (transformers) or forward to an OpenAI-compatible upstream (openai).")
@click.option("--base-url", metavar="URL", help="With --api openai: the upstream's OpenAI API root, e.g. https://api.openai.com/v1.")
@click.option("--key-env", "key_env", metavar="VAR", multiple=True, help="Env var holding an API key this LLM may receive, named *_API_KEY, *_KEY, *_TOKEN or the like (repeatable); never the key itself.")
@click.option("--port", type=int, help="The service's port (1024-65535, unique); default: the first free one from 8180.")
@click.option("--dist", "dists", metavar="DIST", multiple=True, help="Distribution to add it to (repeatable); default: those that have it already, else all.")
@click.option("--half-precision/--full-precision", default=None, help="Load the weights in half precision (GPU).")
@click.option("--context-length", type=int, help="The model's context length in tokens; default: read from the model's files.")
@click.option("--sha256", metavar="HEX", help="Expected sha256 of the model file; refused if it does not match.")
@click.option("--ram-usage", metavar="SIZE", help="Memory limit of the container, e.g. 2G; default: estimated from the weights.")
@click.option("--gpu-usage", metavar="SIZE", help="GPU memory the model needs, e.g. 4G (for MODELS.md and the card).")
@click.option("--license", "license_", metavar="SPDX", help="The model's license, e.g. Apache-2.0.")
@click.option("--description", metavar="TEXT", help="One line for MODELS.md and the card.")
@click.option("--alias", "aliases", metavar="NAME", multiple=True, help="Another name the model answers to in /v1/models (repeatable).")
@click.option("--stop", "stop", metavar="TEXT", multiple=True, help="A stop sequence of the model (repeatable).")
@click.option("--from", "from_card", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Start from this card file (options given here override it).")
@click.option("--dry-run", is_flag=True, help="Print the diff of every file it would change; write nothing.")
@repo_option
def add_llm(name, model, api, base_url, key_env, port, dists, half_precision, context_length, sha256, ram_usage, gpu_usage, license_, description, aliases, stop, from_card, dry_run, repo_path) -> None:
    """Add an LLM (or update it): write its card and regenerate every file that mentions it.

    \b
    Examples:
      parley add-llm transformers-lm-smollm2 --model smollm2-135m-instruct --port 8180
      parley add-llm transformers-lm-tiny --model ./models/tiny.gguf --dist universal_prompted_assistant
      parley add-llm openai-api-gpt4o-mini --api openai --base-url https://api.openai.com/v1 \\
          --model gpt-4o-mini --key-env OPENAI_API_KEY

    Running it twice changes nothing the second time.
    """
    from parley.llms import LlmError, LlmOptions, plan_add_llm

    options = LlmOptions(
        name=name, model=model, api=api, base_url=base_url, key_env=list(key_env), port=port, dists=list(dists),
        half_precision=half_precision, context_length=context_length, sha256=sha256, ram_usage=ram_usage,
        gpu_usage=gpu_usage, license=license_, description=description, aliases=list(aliases), stop=list(stop),
        from_card=from_card,
    )
    repo = _repo(repo_path)
    try:
        card, plan = plan_add_llm(repo, options)
    except (LlmError, CardError, YamlSyntaxError) as error:
        raise _fail(error) from None
    if _report_plan(plan, dry_run, name):
        click.echo(f"next: `parley check`, then `parley up` to try {name} (its URL: http://127.0.0.1:{card.port})", err=True)


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
    if dry_run:
        click.echo(plan.diff(), nl=False)
        return
    for relative in plan.apply():
        click.echo(f"{'removed' if plan.files[relative] is None else 'wrote'} {relative}")


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
@repo_option
def check(no_tools, repo_path) -> None:
    """Verify the whole bundle; print one line per problem ("file: where: what") and exit 1 if any.

    Cards, ports, components.tsv, services vs cards, WAIT_HOSTS, env files and build contexts, every
    generated file, generative configs; then the Compose validator on every overlay combination,
    hadolint on every Dockerfile and `docker stack config` where the docker CLI is installed.

    \b
    Example:
      parley check
    """
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


@click.command(name="up")
@click.argument("dist", default=DEFAULT_DIST)
@click.option("--free-ports", is_flag=True, help="Give every service a free port instead of its own (for tests and side-by-side runs).")
@click.option("--overlay", "overlays", metavar="FILE", multiple=True, help="Overlay of the distribution to apply over its override (repeatable); default: cpu.yml where the distribution has one.")
@click.option("--timeout", "startup_timeout", type=float, default=600.0, show_default=True, help="Seconds each service may take to become healthy.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="Where volumes and rewritten files live (default: .cache/parley-up/DIST).")
@repo_option
def up(dist, free_ports, overlays, startup_timeout, state_dir, repo_path) -> None:
    """Run a distribution on this machine without Docker, from its compose files.

    Each service runs its Dockerfile's CMD (or its compose `command`) from its folder of the
    checkout with the checkout's .venv, its environment and env files; hostnames in URLs become
    127.0.0.1. Services start in dependency order, each waited for on /health. Ctrl-C stops them all.
    Once all are healthy it prints a `PARLEY_SERVICE name url` line per service and `PARLEY_READY`.

    \b
    Examples:
      parley up
      parley up universal_prompted_assistant --free-ports
    """
    import signal

    from parley.up import UpError, run_distribution, serve_forever

    def interrupt(signum, frame):  # SIGTERM stops everything, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started us with it ignored
    repo = _repo(repo_path)
    try:
        with run_distribution(
            repo, dist, free_ports=free_ports, overlays=list(overlays) or None, startup_timeout=startup_timeout, state_dir=state_dir, echo=True
        ) as running:
            serve_forever(running)
    except UpError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        click.echo("parley up: stopped every service", err=True)


@click.command(name="chat")
@click.argument("url", default="http://127.0.0.1:4242")
@click.option("--user-id", default=None, help="The user id to talk as (default: a new one per session).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each answer.")
def chat(url, user_id, timeout) -> None:
    """Chat with an agent in the terminal (an empty line or Ctrl-D ends it).

    \b
    Example:
      parley chat http://127.0.0.1:4242
    """
    from parley.chat import ChatError, chat_loop

    try:
        chat_loop(url, user_id=user_id, timeout=timeout)
    except ChatError as error:
        raise click.ClickException(str(error)) from None


@click.command(name="docs")
@click.option("--check", "check_only", is_flag=True, help="Exit 1 if README.md's command reference is out of date; write nothing.")
@repo_option
def docs(check_only, repo_path) -> None:
    """Paste every command's --help into README.md (between the parley-help markers).

    \b
    Example:
      parley docs --check
    """
    from parley.docs import update_readme

    repo = _repo(repo_path)
    changed = update_readme(repo.path("README.md"), cli, write=not check_only)
    if check_only and changed:
        raise click.ClickException("README.md's command reference is out of date: run `parley docs`")
    click.echo("README.md " + ("updated" if changed else "is up to date"), err=True)


# Each command is registered here, one line each; a new command module adds its own line.
cli.add_command(add_llm)
cli.add_command(remove_llm)
cli.add_command(generate)
cli.add_command(check)
cli.add_command(up)
cli.add_command(chat)
cli.add_command(docs)
cli.add_command(engine)
cli.add_command(stack)
cli.add_command(export_command)
cli.add_command(import_command)
