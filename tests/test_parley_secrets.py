"""The distribution's API keys on the way from `parley secrets init` to each service (tier: the CLI
in-process on a copy of the repository's compose files and cards, the real Compose binary merging
them; no Docker engine — make test-docker and make test-swarm run the same files in Docker).

`.env_secret` reaches every service through the compose files (and so `parley up` and `docker
compose`), never a stack file (a Docker secret instead) and never a bundle (the site gets its own).
Prometheus' start script puts the key in a file of its own, never in its config.
"""

from __future__ import annotations

import json
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from parley.api_keys import SECRET_FILE, first_key, read_keys, write_key_file
from parley.checks import Report, check_services_read_the_keys
from parley.cli import cli
from parley.repo import Repo
from parley.tools import merged_compose
from parley.yamlio import load_yaml_text
from services.prometheus import start as prometheus_start
from support.recording_server import Reply, recording_server
from support.servers import REPO_ROOT

DIST = "universal_prompted_assistant"
COPIED = [".env", "docker-compose.yml", "components", "assistant_dists", "components.tsv", "MODELS.md"]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in COPIED:
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / name)
    for folder in ("services", "skills", "common"):
        (root / folder).symlink_to(REPO_ROOT / folder)
    return root


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env, input=input)


def merged_services(checkout: Path, *overlays: str) -> dict:
    files = ["docker-compose.yml", f"assistant_dists/{DIST}/docker-compose.override.yml",
             *(f"assistant_dists/{DIST}/{overlay}" for overlay in overlays)]
    return merged_compose(checkout, files)["services"]


def test_secrets_init_writes_a_random_key_readable_by_its_owner_only_and_show_prints_it(checkout: Path):
    result = invoke("secrets", "init", "--repo", str(checkout))
    shown = invoke("secrets", "show", "--repo", str(checkout))
    path = checkout / SECRET_FILE

    assert result.exit_code == 0 and "wrote a new API key" in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert shown.output.strip() == first_key(checkout) and len(shown.output.strip()) >= 40
    assert first_key(checkout) not in result.output  # init does not print it


def test_secrets_init_keeps_a_key_in_use_unless_forced(checkout: Path):
    invoke("secrets", "init", "--repo", str(checkout))
    before = first_key(checkout)

    again = invoke("secrets", "init", "--repo", str(checkout))
    forced = invoke("secrets", "init", "--force", "--repo", str(checkout))

    assert again.exit_code == 1 and "--force" in again.output
    assert forced.exit_code == 0 and first_key(checkout) != before


def test_secrets_show_without_a_key_says_how_to_make_one(checkout: Path):
    result = invoke("secrets", "show", "--repo", str(checkout))

    assert result.exit_code == 1 and "parley secrets init" in result.output


def test_every_service_of_the_compose_files_gets_the_key_including_prometheus_and_the_proxy(checkout: Path):
    write_key_file(checkout)
    key = first_key(checkout)

    services = merged_services(checkout, "cpu.yml", "monitoring.yml")
    proxied = merged_services(checkout, "proxy.yml")

    assert {name: service["environment"].get("PARLEY_API_KEYS") for name, service in services.items()} == {
        "agent": key, "prompted-skill": key, "transformers-lm-smollm2": key, "prometheus": key}
    assert proxied["transformers-lm-smollm2"]["environment"]["PARLEY_API_KEYS"] == key  # nginx checks it too


def test_without_a_key_file_the_compose_files_still_run_without_keys(checkout: Path):
    services = merged_services(checkout, "cpu.yml", "monitoring.yml")

    assert all("PARLEY_API_KEYS" not in service.get("environment", {}) for service in services.values())


def test_the_stack_carries_the_key_as_a_docker_secret_never_as_environment(checkout: Path):
    write_key_file(checkout)
    key = first_key(checkout)
    output = checkout / "stack.yml"

    result = invoke("stack", DIST, "--overlay", "cpu.yml", "--overlay", "postgres.yml", "--overlay", "monitoring.yml",
                    "--repo", str(checkout), "-o", str(output))
    text = output.read_text()
    stack = YAML(typ="safe").load(text)

    assert result.exit_code == 0, result.output
    assert key not in text and "PARLEY_API_KEYS:" not in text
    assert stack["secrets"] == {"parley_api_keys": {"external": True}}
    for name, service in stack["services"].items():
        if name == "postgres":  # a database needs no API key
            assert "secrets" not in service and "PARLEY_API_KEYS_FILE" not in service["environment"]
        else:
            assert service["secrets"] == [{"source": "parley_api_keys", "target": "parley_api_keys"}], name
            assert service["environment"]["PARLEY_API_KEYS_FILE"] == "/run/secrets/parley_api_keys", name
    assert "docker secret create parley_api_keys" in result.output


def test_a_bundle_leaves_the_key_home_and_the_site_gets_a_new_one(checkout: Path, tmp_path: Path):
    from parley.bundle import export_distribution, import_bundle

    write_key_file(checkout)

    def fake_docker_save(images: list[str], path: Path) -> None:
        with tarfile.open(path, "w"):
            pass

    bundle = tmp_path / "bundle.tar"
    export_distribution(Repo(checkout), DIST, bundle, ("cpu.yml",), "parley", lambda line: None, fake_docker_save)
    with tarfile.open(bundle) as archive:
        names = archive.getnames()
    imported = import_bundle(bundle, tmp_path / "site", lambda path: [], lambda line: None)

    assert not any(name.endswith(SECRET_FILE) for name in names)
    assert read_keys(imported.folder) and read_keys(imported.folder) != read_keys(checkout)
    assert stat.S_IMODE((imported.folder / SECRET_FILE).stat().st_mode) == 0o600


def test_check_names_a_service_that_does_not_read_the_key_file(checkout: Path):
    override = checkout / "assistant_dists" / DIST / "docker-compose.override.yml"
    override.write_text(override.read_text().replace("""    env_file:
      - path: .env_secret
        required: false
    environment:
      SERVICE_NAME: prompted_skill""", """    environment:
      SERVICE_NAME: prompted_skill"""))

    report = Report()
    documents = {relative: load_yaml_text((checkout / relative).read_text(), relative)
                 for relative in ("docker-compose.yml", f"assistant_dists/{DIST}/docker-compose.override.yml")}
    check_services_read_the_keys(Repo(checkout), Repo(checkout).load_valid_cards(), documents, report)
    problems = report.problems

    assert len(problems) == 1 and any("services.prompted-skill.env_file: does not read .env_secret" in problem for problem in problems), problems


def test_chat_sends_the_key_from_the_environment_and_says_what_to_do_on_a_401():
    def agent(request):
        if request.headers.get("Authorization") != "Bearer chat-test-key-0123456789":
            return Reply(401, {"error": {"message": "an API key is needed", "field": "Authorization"}})
        return Reply(200, {"response": "hello", "active_skill": "prompted_skill", "dialog_id": "d1"})

    with recording_server(agent) as server:
        accepted = invoke("chat", server.base_url, input="hi\n", env={"PARLEY_API_KEY": "chat-test-key-0123456789"})
        refused = invoke("chat", server.base_url, input="hi\n", env={"PARLEY_API_KEY": "wrong-key-0123456789"})

    assert accepted.exit_code == 0 and "bot> hello" in accepted.output
    assert refused.exit_code == 1 and "needs an API key" in refused.output and "PARLEY_API_KEY" in refused.output


def test_prometheus_gets_one_job_per_service_and_the_key_in_a_file_of_its_own(tmp_path: Path):
    environ = {"SCRAPE_TARGETS": "agent=agent:4242, prompted-skill=prompted-skill:8147", "DATA_DIR": str(tmp_path),
               "PARLEY_API_KEYS": "first-key-0123456789,second-key-0123456789", "SERVICE_HOST": "127.0.0.1",
               "SERVICE_PORT": "9999"}

    command = prometheus_start.prepare(environ)
    config = json.loads((tmp_path / "prometheus.yml").read_text())

    assert command[0] == "prometheus" and "--web.listen-address=127.0.0.1:9999" in command
    assert [(job["job_name"], job["static_configs"][0]["targets"]) for job in config["scrape_configs"]] == [
        ("agent", ["agent:4242"]), ("prompted-skill", ["prompted-skill:8147"])]
    assert all(job["authorization"] == {"type": "Bearer", "credentials_file": str(tmp_path / "scrape-key")}
               for job in config["scrape_configs"])
    assert (tmp_path / "scrape-key").read_text() == "first-key-0123456789"
    assert stat.S_IMODE((tmp_path / "scrape-key").stat().st_mode) == 0o600
    assert "first-key" not in (tmp_path / "prometheus.yml").read_text()


def test_prometheus_reads_the_key_from_a_docker_secret_and_finds_swarm_replicas_by_dns(tmp_path: Path):
    secret = tmp_path / "parley_api_keys"
    secret.write_text("swarm-key-0123456789\n")
    config = prometheus_start.scrape_config(
        prometheus_start.parse_targets("agent=agent:4242"), key_file=None,
        replicas_name=lambda host: f"tasks.{host}")

    assert prometheus_start.first_key({"PARLEY_API_KEYS_FILE": str(secret)}) == "swarm-key-0123456789"
    assert config["scrape_configs"][0]["dns_sd_configs"] == [{"names": ["tasks.agent"], "type": "A", "port": 4242}]
    assert "authorization" not in config["scrape_configs"][0]


@pytest.mark.parametrize("targets", ["", "agent", "agent=agent", "=agent:1"])
def test_prometheus_refuses_targets_it_cannot_read(targets: str):
    with pytest.raises(prometheus_start.ConfigError, match="SCRAPE_TARGETS"):
        prometheus_start.parse_targets(targets)


def test_the_key_file_is_git_ignored_and_not_sent_to_image_builds():
    assert ".env_secret" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    dockerignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in dockerignore and not any(".env_secret" in line for line in dockerignore if line.startswith("!"))
