"""Adding an LLM is one command, removing it leaves no trace, and `parley check` catches every drift.

Every test works on a temporary copy of the repository's bundle (cards, distributions, services).
"""

from __future__ import annotations

import re

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.checkout import copy_bundle, run_parley, write_tiny_gguf

DIST = "universal_prompted_assistant"
OVERRIDE = f"assistant_dists/{DIST}/docker-compose.override.yml"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repository's bundle, as `parley` sees it."""
    return copy_bundle(tmp_path / "repo")


@pytest.fixture
def gguf_model(tmp_path: Path) -> Path:
    """A small GGUF file that declares a 2048-token context, an EOS token and its dimensions (no chat template)."""
    return write_tiny_gguf(tmp_path / "models" / "tiny-chat.gguf")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A transformers model directory (config.json, tokenizer config, weights) with a 1024-token context."""
    from safetensors.numpy import save_file

    path = tmp_path / "models" / "tiny-dir"
    path.mkdir(parents=True)
    config = {"model_type": "llama", "max_position_embeddings": 1024, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "hidden_size": 8, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "added_tokens_decoder": {"2": {"content": "</s>"}}}))
    save_file({"model.embed_tokens.weight": np.zeros((16, 8), dtype=np.float32)}, str(path / "model.safetensors"))
    return path


parley = run_parley


def snapshot(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def read(root: Path, relative: str) -> str:
    return (root / relative).read_text()


# --- adding and removing -----------------------------------------------------------------------


def test_the_repository_itself_passes_check(checkout: Path):
    assert parley(checkout, "check") == "ok: the bundle is consistent\n"


def test_adding_a_gguf_and_a_directory_model_wires_every_file_and_check_passes(checkout: Path, gguf_model: Path, model_dir: Path):
    parley(checkout, "add-llm", "transformers-lm-tiny-gguf", "--model", str(gguf_model), "--license", "MIT")
    parley(checkout, "add-llm", "transformers-lm-tiny-dir", "--model", str(model_dir), "--port", "8190")

    assert parley(checkout, "check") == "ok: the bundle is consistent\n"
    card = read(checkout, "components/transformers-lm-tiny-gguf.yml")
    assert f"source: {gguf_model}" in card and "context_length: 2048" in card
    assert "url: http://transformers-lm-tiny-gguf:8181/respond" in card  # the first free port from 8180
    assert "8181\ttransformers-lm-tiny-gguf\n" in read(checkout, "components.tsv")
    assert "8190\ttransformers-lm-tiny-dir\n" in read(checkout, "components.tsv")
    override = read(checkout, OVERRIDE)
    assert f"- {gguf_model}:/models/transformers-lm-tiny-gguf/tiny-chat.gguf:ro" in override
    assert "PRETRAINED_MODEL_NAME_OR_PATH: /models/transformers-lm-tiny-gguf/tiny-chat.gguf" in override
    assert f"- {model_dir}:/models/transformers-lm-tiny-dir:ro" in override
    assert 'WAIT_HOSTS: "prompted-skill:8147, transformers-lm-smollm2:8180, transformers-lm-tiny-gguf:8181, transformers-lm-tiny-dir:8190"' in override
    assert '"http://transformers-lm-tiny-dir:8190/respond": {"key_env_vars": []' in override
    assert "transformers-lm-tiny-gguf:\n        condition: service_healthy" in override
    # each memory limit is its model's estimate: weights + KV cache + the backend's runtime
    assert "memory: 576M" in override  # the GGUF, on llama_cpp
    assert "memory: 896M" in override  # the folder, on transformers (float32, its prefix cache)
    assert '"127.0.0.1:8181:8181"' in read(checkout, f"assistant_dists/{DIST}/dev.yml")
    assert "transformers-lm-tiny-dir:\n    environment:\n      DEVICE: cpu" in read(checkout, f"assistant_dists/{DIST}/cpu.yml")
    assert "PROXY_PASS: ${PARLEY_PROXY_HOST:-host.docker.internal}:8190" in read(checkout, f"assistant_dists/{DIST}/proxy.yml")
    for name in ("transformers-lm-tiny-gguf", "transformers-lm-tiny-dir"):
        assert (checkout / f"services/transformers_lm/service_configs/{name}/service.yml").is_file()
        assert f"SERVICE_NAME: {name}" in read(checkout, f"services/transformers_lm/service_configs/{name}/environment.yml")
        assert json.loads(read(checkout, f"common/generative_configs/{name}.json"))["max_new_tokens"] > 0
    assert "| `transformers-lm-tiny-gguf` | " in read(checkout, "MODELS.md")
    assert "| 8181 | 2048 | 576M / — | MIT |" in read(checkout, "MODELS.md")


def test_removing_the_added_models_restores_the_tree_byte_for_byte(checkout: Path, gguf_model: Path, model_dir: Path):
    before = snapshot(checkout)
    parley(checkout, "add-llm", "transformers-lm-tiny-gguf", "--model", str(gguf_model))
    parley(checkout, "add-llm", "transformers-lm-tiny-dir", "--model", str(model_dir))
    assert snapshot(checkout) != before

    parley(checkout, "remove-llm", "transformers-lm-tiny-gguf")
    parley(checkout, "remove-llm", "transformers-lm-tiny-dir")

    assert snapshot(checkout) == before


def test_adding_the_same_model_twice_changes_nothing_the_second_time(checkout: Path, gguf_model: Path):
    parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(gguf_model))
    after_first = snapshot(checkout)

    output = parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(gguf_model))

    assert snapshot(checkout) == after_first
    assert "nothing to change" in output


def test_the_shipped_default_llm_is_exactly_what_add_llm_writes(checkout: Path):
    before = snapshot(checkout)

    output = parley(checkout, "add-llm", "transformers-lm-smollm2", "--model", "smollm2-135m-instruct")

    assert "nothing to change" in output
    assert snapshot(checkout) == before


def test_changing_an_option_edits_the_card_in_place_and_keeps_its_comments(checkout: Path):
    card = "components/transformers-lm-smollm2.yml"
    before = read(checkout, card).splitlines()

    parley(checkout, "add-llm", "transformers-lm-smollm2", "--model", "smollm2-135m-instruct", "--context-length", "4096")

    after = read(checkout, card).splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(after) == len(before)
    # Twice the context is twice the KV cache of 16 slots: the memory limit grows with it.
    assert changed == [("ram_usage: 1536M", "ram_usage: 2240M"), ("  context_length: 2048", "  context_length: 4096")]
    assert "| 8180 | 4096 | 2240M / — |" in read(checkout, "MODELS.md")
    assert parley(checkout, "check").strip().endswith("ok: the bundle is consistent")


def test_a_model_inside_the_repository_is_named_relative_to_it_so_the_files_work_on_any_machine(checkout: Path, gguf_model: Path):
    (checkout / "models").mkdir(exist_ok=True)
    shutil.copy(gguf_model, checkout / "models" / "tiny.gguf")

    parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(checkout / "models" / "tiny.gguf"))
    again = parley(checkout, "add-llm", "transformers-lm-tiny")

    assert "source: ./models/tiny.gguf" in read(checkout, "components/transformers-lm-tiny.yml")
    assert "- ./models/tiny.gguf:/models/transformers-lm-tiny/tiny.gguf:ro" in read(checkout, OVERRIDE)
    assert "nothing to change" in again


def test_dry_run_prints_the_diff_and_writes_nothing(checkout: Path, gguf_model: Path):
    before = snapshot(checkout)

    output = parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(gguf_model), "--dry-run")

    assert snapshot(checkout) == before
    assert "+++ b/components/transformers-lm-tiny.yml" in output
    assert "+  transformers-lm-tiny:" in output


def test_an_openai_api_llm_gets_its_base_url_key_env_and_a_key_map_entry(checkout: Path):
    parley(
        checkout, "add-llm", "openai-api-gpt4o-mini", "--api", "openai", "--base-url", "https://api.openai.com/v1",
        "--model", "gpt-4o-mini", "--key-env", "OPENAI_API_KEY",
    )

    assert parley(checkout, "check") == "ok: the bundle is consistent\n"
    override = read(checkout, OVERRIDE)
    assert "dockerfile: services/openai_api_lm/Dockerfile" in override
    assert "OPENAI_BASE_URL: https://api.openai.com/v1" in override
    assert "OPENAI_API_KEY_ENV_VAR: OPENAI_API_KEY" in override
    assert '"http://openai-api-gpt4o-mini:8181/respond": {"key_env_vars": ["OPENAI_API_KEY"]' in override
    assert "openai-api-gpt4o-mini" not in read(checkout, f"assistant_dists/{DIST}/cpu.yml")
    assert (checkout / "services/openai_api_lm/service_configs/openai-api-gpt4o-mini/service.yml").is_file()


def test_a_card_written_by_hand_is_taken_with_from(checkout: Path, gguf_model: Path, tmp_path: Path):
    parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(gguf_model), "--description", "A tiny test model")
    card = tmp_path / "card.yml"
    card.write_text(read(checkout, "components/transformers-lm-tiny.yml"))
    parley(checkout, "remove-llm", "transformers-lm-tiny")

    parley(checkout, "add-llm", "transformers-lm-tiny", "--from", str(card))

    assert read(checkout, "components/transformers-lm-tiny.yml") == card.read_text()


# --- input refused before anything is written --------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["Tiny Model", "--model", "smollm2-135m-instruct"], "is not a lowercase DNS label"),
        (["../escape", "--model", "smollm2-135m-instruct"], "is not a lowercase DNS label"),
        (["Transformers-LM", "--model", "smollm2-135m-instruct"], "is not a lowercase DNS label"),
        (["tiny", "--model", "smollm2-135m-instruct", "--port", "8147"], "--port 8147 is taken by prompted-skill"),
        (["tiny", "--model", "smollm2-135m-instruct", "--port", "80"], "--port 80 is outside 1024-65535"),
        (["tiny", "--model", "./no/such/model.gguf"], "does not exist"),
        (["tiny", "--model", "not a hub id!"], "nor a valid Hugging Face id"),
        (["tiny", "--model", "smollm2-135m-instruct", "--sha256", "0" * 64], "--sha256 does not match"),
        (["tiny", "--model", "smollm2-135m-instruct", "--dist", "nowhere"], "--dist 'nowhere': no assistant_dists/nowhere"),
        (["tiny", "--api", "openai", "--model", "gpt-4o"], "--api openai needs --base-url"),
        (["tiny", "--model", "smollm2-135m-instruct", "--key-env", "lower-case"], "is not an env var name"),
        (["agent", "--model", "smollm2-135m-instruct"], "components/agent.yml is not an LLM"),
        (
            ["hosted", "--api", "openai", "--base-url", "https://llm.example/v1", "--model", "m", "--key-env", "MY_LLM_AUTH"],
            "--key-env 'MY_LLM_AUTH' must end in _API_KEY, _KEY",
        ),
    ],
)
def test_bad_input_is_refused_with_a_fix_and_nothing_is_written(checkout: Path, args: list[str], message: str):
    before = snapshot(checkout)

    output = parley(checkout, "add-llm", *args, code=1)

    assert message in output
    assert snapshot(checkout) == before


def test_removing_the_default_llm_of_a_skill_is_refused_naming_where_it_is_used(checkout: Path):
    output = parley(checkout, "remove-llm", "transformers-lm-smollm2", code=1)

    assert "components/prompted-skill.yml: skill.llm" in output


def test_an_invalid_card_is_reported_as_file_field_message(checkout: Path):
    card = checkout / "components/transformers-lm-smollm2.yml"
    card.write_text(card.read_text().replace("context_length: 2048", "context_length: lots"))

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: model.context_length: Input should be a valid integer" in output


def test_an_unknown_card_field_is_reported_with_the_fields_a_card_has(checkout: Path):
    card = checkout / "components/transformers-lm-smollm2.yml"
    card.write_text(card.read_text() + "ram_usgae: 2G\n")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: ram_usgae: unknown key; allowed keys: author," in output
    assert "ram_usage" in output.split("ram_usgae: unknown key", 1)[1].splitlines()[0]


def test_a_card_whose_key_env_var_the_agent_would_store_is_refused(checkout: Path):
    # The agent keeps a turn's key fields out of the dialog state by their names; YANDEX_FOLDER_ID
    # is not such a name, so a key sent under it would be stored.
    card = checkout / "components/transformers-lm-smollm2.yml"
    card.write_text(card.read_text().replace("key_env_vars: []", "key_env_vars: [YANDEX_FOLDER_ID]"))

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: model.key_env_vars: 'YANDEX_FOLDER_ID' must end in _API_KEY" in output


@pytest.mark.parametrize("autoscaling, message", [
    ("min_replicas: 3\n    max_replicas: 2", "deploy.autoscaling: min_replicas (3) must be at most max_replicas (2)"),
    ("min_replicas: 1\n    initial_replicas: 5\n    max_replicas: 2",
     "deploy.autoscaling: initial_replicas (5) must be within min_replicas (1) and max_replicas (2)"),
    ("min_replicas: 0\n    max_replicas: 2", "deploy.autoscaling.min_replicas: Input should be greater than or equal to 1"),
    ("max_replicas: 2\n    target_ongoing_requests: 0", "deploy.autoscaling.target_ongoing_requests: Input should be greater than 0"),
    ("max_replicas: 2\n    downscale_delay: 60", "deploy.autoscaling.downscale_delay: unknown key; allowed keys: downscale_delay_s,"),
], ids=["min over max", "initial outside the bounds", "no replica", "no target", "a misspelt field"])
def test_check_refuses_autoscaling_bounds_out_of_order_naming_the_field(checkout: Path, autoscaling: str, message: str):
    card = checkout / "components/transformers-lm-smollm2.yml"
    text = card.read_text()
    card.write_text(text.split("\n  autoscaling:\n", 1)[0] + "\n  autoscaling:\n    " + autoscaling + "\n")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"components/transformers-lm-smollm2.yml: {message}" in output


def test_check_refuses_fixed_replicas_beside_autoscaling(checkout: Path):
    edit(checkout, "components/transformers-lm-smollm2.yml", "deploy:\n  cpus: 1\n", "deploy:\n  replicas: 2\n  cpus: 1\n")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: deploy: give either replicas or autoscaling" in output


def test_check_refuses_autoscaling_on_a_component_that_does_not_report_its_load(checkout: Path):
    (checkout / "components/agent.yml").write_text(
        read(checkout, "components/agent.yml").replace("  replicas: 2\n", "  autoscaling:\n    max_replicas: 3\n"))

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/agent.yml: (card): deploy.autoscaling: only an LLM service" in output


# --- one test per drift `parley check` catches -------------------------------------------------


def edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1))


def test_check_catches_a_duplicate_port(checkout: Path, gguf_model: Path):
    parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(gguf_model), "--port", "8190")
    edit(checkout, "components/transformers-lm-tiny.yml", "transformers-lm-tiny:8190", "transformers-lm-tiny:8180")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-tiny.yml: connector.url: port 8180 is also used by components/transformers-lm-smollm2.yml" in output


def test_check_catches_a_compose_service_without_a_card(checkout: Path):
    edit(checkout, OVERRIDE, "\n  prompted-skill:\n", "\n  orphan:\n    image: busybox\n  prompted-skill:\n")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"{OVERRIDE}: services.orphan: no card components/orphan.yml" in output


def test_check_catches_a_card_without_a_service(checkout: Path):
    card = read(checkout, "components/transformers-lm-smollm2.yml").replace("transformers-lm-smollm2", "transformers-lm-lonely")
    (checkout / "components/transformers-lm-lonely.yml").write_text(card.replace(":8180/", ":8199/"))

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-lonely.yml: no compose service transformers-lm-lonely in any distribution" in output


def test_check_catches_a_wait_hosts_gap(checkout: Path):
    edit(checkout, OVERRIDE, "prompted-skill:8147, transformers-lm-smollm2:8180", "prompted-skill:8147")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"{OVERRIDE}: services.agent.environment.WAIT_HOSTS: missing transformers-lm-smollm2:8180" in output


def test_check_catches_a_stale_models_md(checkout: Path):
    edit(checkout, "MODELS.md", "| 8180 |", "| 8181 |")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "MODELS.md: line 9: differs from what the cards generate; run `parley generate`" in output


def test_check_catches_a_bad_generative_config_key(checkout: Path):
    edit(checkout, "common/generative_configs/transformers-lm-smollm2.json", '"do_sample"', '"do_sampel"')

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "common/generative_configs/transformers-lm-smollm2.json: do_sampel: unknown key" in output


def test_check_catches_a_bad_generative_config_value(checkout: Path):
    edit(checkout, "common/generative_configs/transformers-lm-smollm2.json", '"min_new_tokens": 1', '"min_new_tokens": -7')

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "common/generative_configs/transformers-lm-smollm2.json: min_new_tokens: Input should be greater than or equal to 0" in output


def test_check_catches_a_missing_env_file(checkout: Path):
    (checkout / ".env").unlink()

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"{OVERRIDE}: services.transformers-lm-smollm2.env_file: .env does not exist" in output


def test_check_catches_a_missing_build_context(checkout: Path):
    edit(checkout, OVERRIDE, "dockerfile: services/transformers_lm/Dockerfile", "dockerfile: services/no_such/Dockerfile")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"{OVERRIDE}: services.transformers-lm-smollm2.build.dockerfile: services/no_such/Dockerfile does not exist" in output


def test_check_catches_a_missing_proxy_entry(checkout: Path):
    edit(checkout, f"assistant_dists/{DIST}/proxy.yml", "\n  transformers-lm-smollm2:", "\n  transformers-lm-smollm2-gone:")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"assistant_dists/{DIST}/proxy.yml: services.transformers-lm-smollm2: missing its proxy entry" in output


def test_check_catches_invalid_overlay_yaml(checkout: Path):
    (checkout / f"assistant_dists/{DIST}/dev.yml").write_text("services:\n  agent:\n    ports: [\n")

    output = parley(checkout, "check", code=1)

    assert f"assistant_dists/{DIST}/dev.yml: line 4: " in output


def test_check_catches_what_only_the_compose_validator_knows(checkout: Path):
    edit(checkout, OVERRIDE, "memory: 256M", "memory: lots")

    output = parley(checkout, "check", code=1)

    assert f"{OVERRIDE}: docker compose -f docker-compose.yml -f {OVERRIDE} config:" in output
    assert "lots" in output


def test_a_validator_error_names_the_file_that_holds_the_fault_not_the_last_of_the_combination(checkout: Path):
    edit(checkout, "docker-compose.yml", "init: true", "init: maybe")

    output = parley(checkout, "check", code=1)

    # Every distribution combines the base file with its override; the fault is named in the base file.
    assert re.search(r"^docker-compose\.yml: docker compose -f docker-compose\.yml -f assistant_dists/\w+/docker-compose\.override\.yml config:", output, re.M)
    assert "services.agent.init" in output
    assert "docker-compose.override.yml: docker compose" not in output


def test_check_runs_hadolint_on_every_dockerfile(checkout: Path):
    with open(checkout / "services/agent/Dockerfile", "a") as dockerfile:
        dockerfile.write("RUN cd /tmp && echo hi\n")

    output = parley(checkout, "check", code=1)

    assert "services/agent/Dockerfile: line " in output
    assert "DL3003" in output  # "Use WORKDIR to switch to a directory"


def test_check_catches_a_hand_written_service_on_another_port_than_its_card(checkout: Path):
    edit(checkout, "components/prompted-skill.yml", "prompted-skill:8147", "prompted-skill:8148")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"{OVERRIDE}: services.prompted-skill.environment.SERVICE_PORT: 8147, but components/prompted-skill.yml says 8148" in output
    assert (
        f"assistant_dists/{DIST}/pipeline_conf.json: services.skills.prompted_skill.connector.url: port 8147, "
        "but components/prompted-skill.yml says 8148"
    ) in output


def test_check_catches_a_hand_written_memory_limit_that_is_not_its_cards_ram_usage(checkout: Path):
    edit(checkout, "components/agent.yml", "ram_usage: 256M", "ram_usage: 512M")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "docker-compose.yml: services.agent.deploy.resources.limits.memory: 256M, but components/agent.yml says ram_usage 512M" in output


def test_check_catches_a_default_llm_that_is_not_an_llm_of_the_cards(checkout: Path):
    edit(checkout, OVERRIDE, "GENERATIVE_SERVICE_URL: http://transformers-lm-smollm2:8180/respond", "GENERATIVE_SERVICE_URL: http://transformers-lm-gone:8180/respond")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"{OVERRIDE}: services.prompted-skill.environment.GENERATIVE_SERVICE_URL: http://transformers-lm-gone:8180/respond is not an LLM's /respond URL" in output


def test_check_catches_a_generated_file_edited_by_hand(checkout: Path):
    edit(checkout, f"assistant_dists/{DIST}/cpu.yml", "      DEVICE: cpu", "      DEVICE: cuda")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (
        f"assistant_dists/{DIST}/cpu.yml: services.transformers-lm-smollm2.environment.DEVICE: "
        "differs from what the cards generate; run `parley generate`"
    ) in output


def test_generate_repairs_what_check_found(checkout: Path):
    edit(checkout, f"assistant_dists/{DIST}/cpu.yml", "      DEVICE: cpu", "      DEVICE: cuda")
    edit(checkout, "MODELS.md", "| 8180 |", "| 8181 |")

    parley(checkout, "generate")

    assert parley(checkout, "check", "--no-tools") == "ok: the bundle is consistent\n"


# --- the generated environment is what each service reads --------------------------------------


def _generated_environment(root: Path, service: str) -> dict[str, str]:
    from ruamel.yaml import YAML

    document = YAML(typ="safe").load(read(root, OVERRIDE))
    return {key: str(value) for key, value in document["services"][service]["environment"].items()}


def test_the_llm_service_reads_every_setting_its_card_generates(checkout: Path, gguf_model: Path, tmp_path: Path):
    from common.settings_support import resolve_repo_path
    from services.transformers_lm.settings import Settings

    card = tmp_path / "card.yml"
    parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(gguf_model), "--alias", "tiny", "--stop", "</s>")
    card.write_text(
        read(checkout, "components/transformers-lm-tiny.yml").replace(
            "prompt_format:\n", "prompt_format:\n    user: '<|user|>{instruction}\\n'\n    trailing_assistant: '<|assistant|>'\n"
        )
    )
    parley(checkout, "add-llm", "transformers-lm-tiny", "--from", str(card))

    settings = Settings.from_env(_generated_environment(checkout, "transformers-lm-tiny"))

    assert settings.served_model_names == ["transformers-lm-tiny", "tiny"]  # the card's name, never a container path
    assert settings.stop_sequences == ("</s>",)
    assert settings.prompt_format is not None and settings.prompt_format.trailing_assistant == "<|assistant|>"
    assert settings.service_port == 8181
    assert settings.generative_config == resolve_repo_path("common/generative_configs/transformers-lm-tiny.json")


def test_an_invalid_prompt_format_in_a_card_is_refused_naming_the_field(checkout: Path):
    card = checkout / "components/transformers-lm-smollm2.yml"
    card.write_text(card.read_text().replace("prompt_format:\n", "prompt_format:\n    usr: '{instruction}'\n"))

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: model.prompt_format: usr: unknown key; allowed keys: assistant," in output


def test_the_openai_api_service_and_the_skill_read_what_add_llm_generates(checkout: Path, monkeypatch: pytest.MonkeyPatch):
    from services.openai_api_lm.settings import Settings as OpenAISettings
    from skills.prompted_skill.settings import Settings as SkillSettings

    parley(
        checkout, "add-llm", "openai-api-mini", "--api", "openai", "--base-url", "http://127.0.0.1:9/v1",
        "--model", "mini", "--key-env", "MINI_API_KEY",
    )

    upstream = OpenAISettings.from_env({**_generated_environment(checkout, "openai-api-mini"), "MINI_API_KEY": "sk-test"})
    skill = SkillSettings.from_env(_generated_environment(checkout, "prompted-skill"))

    assert upstream.openai_base_url == "http://127.0.0.1:9/v1" and upstream.pretrained_model_name_or_path == "mini"
    assert upstream.api_key is not None and upstream.api_key.get_secret_value() == "sk-test"
    assert skill.llm_endpoints["http://openai-api-mini:8181/respond"].key_env_vars == ["MINI_API_KEY"]
    assert "http://transformers-lm-smollm2:8180/respond" in skill.llm_endpoints
