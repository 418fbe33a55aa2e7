"""One file, many names, and `/render`: a card made by `parley add-llm --scan` from a copy of the
embedded GGUF is served under the card's name with the registry's settings, its `names` give one
set of weights several prompts, and `/render` shows the exact prompt a request becomes — with the
token count the real request reports.

Tier: real LLM services (gunicorn on loopback) on the real embedded model, on both backends, one
server per backend for the module, started from the environment `parley generate` wrote for the card.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests
from ruamel.yaml import YAML
from support.checkout import copy_bundle, run_parley
from support.errors import assert_openai_error
from support.servers import RunningServer, service_server

from common.model_sources import DEFAULT_MODEL_NAME, embedded_model_path

pytestmark = pytest.mark.model

CARD = "transformers-lm-smollm-copy"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIRATE_PROMPT = "You are a pirate. Answer like one."
NAMES = f"""  names:
    pirate:
      description: the same weights, as a pirate
      system_prompt: {PIRATE_PROMPT}
      generation_config:
        max_new_tokens: 8
    plain:
      description: the same weights, with Dream's plain lines
      prompt_format:
        user: "Human: {{instruction}}\\n"
        assistant: "AI: {{instruction}}\\n"
        trailing_assistant: "AI:"
"""
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the bundle where `add-llm --scan` added a copy of the embedded GGUF, given two more names."""
    root = copy_bundle(tmp_path_factory.mktemp("names") / "repo")
    models = root.parent / "models"
    models.mkdir()
    shutil.copy2(embedded_model_path(DEFAULT_MODEL_NAME), models / "smollm-copy.gguf")
    run_parley(root, "add-llm", "--scan", str(models))
    card = root / "components" / f"{CARD}.yml"
    card.write_text(card.read_text().replace("  names: {}\n", NAMES))
    run_parley(root, "generate")
    assert run_parley(root, "check", "--no-tools") == "ok: the bundle is consistent\n"
    return root


def generated_environment(root: Path) -> dict[str, str]:
    """The card's service environment as `parley generate` wrote it, with its container paths mapped
    to this machine (the model file's volume, the generative config in the copy)."""
    folder = root / "services" / "transformers_lm" / "service_configs" / CARD
    yaml = YAML(typ="safe")
    env = {key: str(value) for key, value in yaml.load((folder / "environment.yml").read_text()).items()}
    compose = yaml.load((folder / "service.yml").read_text())["compose"]
    for volume in compose["volumes"]:
        source, target, _ = volume.split(":")
        if env["PRETRAINED_MODEL_NAME_OR_PATH"] == target:
            env["PRETRAINED_MODEL_NAME_OR_PATH"] = str((root / source).resolve())
    env["GENERATIVE_CONFIG"] = str(root / env["GENERATIVE_CONFIG"])
    env.pop("SERVICE_PORT")
    return env


@pytest.fixture(scope="module", params=["llama_cpp", "transformers"])
def served(request, bundle: Path):
    env = {**generated_environment(bundle), "BACKEND": request.param}
    with service_server("transformers_lm", env, startup_timeout_seconds=600) as server:
        yield server


def render(server: RunningServer, body: dict) -> dict:
    response = requests.post(server.url("/v1/render"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_card_made_from_the_copy_pins_the_file_and_names_the_service(bundle: Path):
    env = generated_environment(bundle)

    assert env["MODEL_SHA256"] == SHA256 and env["SERVED_MODEL_NAME"] == CARD
    assert env["PRETRAINED_MODEL_NAME_OR_PATH"].endswith("/models/smollm-copy.gguf")


def test_v1_models_lists_the_cards_name_its_names_and_aliases_never_a_path(served: RunningServer):
    ids = [model["id"] for model in requests.get(served.url("/v1/models"), timeout=10).json()["data"]]

    assert ids == [CARD, "pirate", "plain", "SmolLM2-135M-Instruct"]


def test_health_shows_the_registrys_settings_being_served(served: RunningServer):
    health = requests.get(served.url("/health"), timeout=10).json()

    assert health["context_length"] == 2048 and health["max_batch_size"] == 16
    assert health["stop"] == ["<|im_end|>"] and 2 in health["stop_token_ids"]  # <|im_end|>
    assert health["model_sha256"] == SHA256
    assert health["names"] == [CARD, "pirate", "plain", "SmolLM2-135M-Instruct"]


def test_two_names_of_one_file_render_two_different_prompts(served: RunningServer):
    own = render(served, {"model": CARD, "messages": QUESTION})
    pirate = render(served, {"model": "pirate", "messages": QUESTION})
    plain = render(served, {"model": "plain", "messages": QUESTION})

    assert len({own["prompt"], pirate["prompt"], plain["prompt"]}) == 3
    assert own["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert pirate["prompt"] == (
        f"<|im_start|>system\n{PIRATE_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert plain["prompt"] == "Human: What is the capital of France?\nAI:"


def test_a_request_gets_its_names_default_generation_config(served: RunningServer):
    own = render(served, {"model": CARD, "messages": QUESTION})
    pirate = render(served, {"model": "pirate", "messages": QUESTION})
    asked = render(served, {"model": "pirate", "messages": QUESTION, "max_tokens": 3, "temperature": 0.5})

    assert own["generation_config"]["max_new_tokens"] == 64  # the registry's default
    assert own["generation_config"]["do_sample"] is False
    assert pirate["generation_config"]["max_new_tokens"] == 8  # the name's own
    assert asked["generation_config"]["max_new_tokens"] == 3 and asked["generation_config"]["temperature"] == 0.5


@pytest.mark.parametrize("name", [CARD, "pirate", "plain"])
def test_render_counts_the_tokens_the_real_request_reports(served: RunningServer, name: str):
    body = {"model": name, "messages": [{"role": "system", "content": "Be brief."}, *QUESTION], "max_tokens": 4}

    rendered = render(served, body)
    completion = requests.post(served.url("/v1/chat/completions"), json=body, timeout=300)

    assert completion.status_code == 200, completion.text
    assert rendered["prompt_tokens"] == completion.json()["usage"]["prompt_tokens"] == len(rendered["token_ids"])


def test_dream_render_uses_the_cards_own_name_and_the_prompt_v1_render_shows(served: RunningServer):
    dream = requests.post(
        served.url("/render"), json={"dialog_contexts": [["What is the capital of France?"]], "prompts": ["Be brief."]}, timeout=60
    ).json()
    v1 = render(served, {"model": CARD, "messages": [{"role": "system", "content": "Be brief."}, *QUESTION]})

    assert dream["model"] == CARD
    (item,) = dream["rendered"]
    assert (item["prompt"], item["prompt_tokens"]) == (v1["prompt"], v1["prompt_tokens"])
    assert item["generation_config"]["min_new_tokens"] == 1  # Dream requests keep the default config's minimum


def test_dream_render_takes_a_name_and_several_dialogs(served: RunningServer):
    body = {"dialog_contexts": [["Hi!"], ["Hello", "Hi, how can I help?", "Tell me a joke."]], "model": "plain"}

    dream = requests.post(served.url("/render"), json=body, timeout=60).json()

    assert [item["prompt"] for item in dream["rendered"]] == [
        "Human: Hi!\nAI:",
        "Human: Hello\nAI: Hi, how can I help?\nHuman: Tell me a joke.\nAI:",
    ]


def test_a_dialog_longer_than_the_context_is_rendered_as_it_is_cut(served: RunningServer):
    turns = [f"Turn {index}: " + "tell me more about the history of Paris " * 12 for index in range(60)]
    messages = [{"role": "user" if index % 2 == 0 else "assistant", "content": text} for index, text in enumerate(turns + ["Last?"])]

    rendered = render(served, {"model": CARD, "messages": messages, "max_tokens": 16})

    assert rendered["dropped_turns"] > 0
    assert rendered["prompt_tokens"] <= 2048 - 16
    assert rendered["prompt"].rstrip().endswith("Last?<|im_end|>\n<|im_start|>assistant")


def test_a_name_not_served_is_a_404_naming_the_model(served: RunningServer):
    v1 = requests.post(served.url("/v1/render"), json={"model": "nope", "messages": QUESTION}, timeout=10)
    dream = requests.post(served.url("/render"), json={"dialog_contexts": [["Hi"]], "model": "nope"}, timeout=10)

    assert_openai_error(v1, 404, param="model")
    assert dream.status_code == 404 and dream.json()["error"]["field"] == "model"
    assert "this service serves: transformers-lm-smollm-copy, pirate, plain, SmolLM2-135M-Instruct" in dream.json()["error"]["message"]


def _resident_bytes(pid: int) -> int:
    """VmRSS of a process and its children (gunicorn's master and its worker)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if int(entry) == pid or parent == pid:
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return total


def test_the_service_stays_within_the_cards_memory_estimate(served: RunningServer, bundle: Path):
    import json

    rows = {row["name"]: row for row in json.loads(run_parley(bundle, "list", "--json"))}
    requests.post(served.url("/v1/chat/completions"), json={"model": CARD, "messages": QUESTION, "max_tokens": 8}, timeout=300)

    backend = requests.get(served.url("/health"), timeout=10).json()["backend"]
    estimate = rows[CARD]["ram_estimate"] if backend == "llama_cpp" else None
    if estimate is None:  # the card is for llama_cpp; the same model on transformers: its own estimate
        from common.model_facts import read_model_facts
        from parley.memory import estimate_llm_memory

        facts = read_model_facts(embedded_model_path(DEFAULT_MODEL_NAME))
        estimate = estimate_llm_memory(facts, backend="transformers", context_length=2048, batch_slots=16).total
    assert _resident_bytes(served.process.pid) <= estimate
