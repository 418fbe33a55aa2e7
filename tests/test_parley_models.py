"""A model is known by its file: `add-llm` reads the model's own files, recognises a file by its sha256
in models/known.yml and pins it; `parley check` catches a card that disagrees with its model or
whose memory limit cannot hold it; `parley list` shows every LLM; `parley up` refuses a
distribution larger than the machine.

Tier: `parley` in-process on a temporary copy of the bundle, with the real embedded GGUF (copied
under other names) and the real Compose merger. tests/test_model_names_and_render.py serves such
cards with both backends.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from support.checkout import copy_bundle, run_parley, write_tiny_gguf
from support.servers import REPO_ROOT

from common.model_sources import DEFAULT_MODEL_NAME, embedded_model_path, file_sha256
from parley.cards import load_card
from parley.known_models import load_known_models
from parley.memory import available_memory

DIST = "universal_prompted_assistant"
# Every shipped distribution runs the embedded model.
ALL_DISTS = ["multiskill_assistant", "universal_prompted_assistant", "universal_ru_prompted_assistant"]
OVERRIDE = f"assistant_dists/{DIST}/docker-compose.override.yml"
SHIPPED = "components/transformers-lm-smollm2.yml"
EMBEDDED = embedded_model_path(DEFAULT_MODEL_NAME)
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

parley = run_parley


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return copy_bundle(tmp_path / "repo")


@pytest.fixture
def models_folder(tmp_path: Path) -> Path:
    """A models folder holding the embedded GGUF under another name."""
    folder = tmp_path / "my-models"
    folder.mkdir()
    shutil.copy2(EMBEDDED, folder / "my-smollm.gguf")
    return folder


def edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1))


def environment(root: Path, service: str) -> dict[str, str]:
    document = YAML(typ="safe").load((root / OVERRIDE).read_text())
    return {key: str(value) for key, value in document["services"][service]["environment"].items()}


# --- the registry ---------------------------------------------------------------------------------


def test_the_registry_knows_the_embedded_models_file_by_its_sha256():
    known = load_known_models(REPO_ROOT).get(file_sha256(EMBEDDED))

    assert file_sha256(EMBEDDED) == EMBEDDED_SHA256
    assert known is not None and known.family == "smollm2" and known.stop == ["<|im_end|>"]


def test_check_reports_a_registry_entry_that_is_not_valid(checkout: Path):
    edit(checkout, "models/known.yml", "  family: smollm2\n", "  family: smollm2\n  contxt: 4096\n")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"models/known.yml: {EMBEDDED_SHA256[:12]}…: contxt: unknown key" in output


# --- recognised by sha256 -------------------------------------------------------------------------


def test_a_known_file_under_another_name_gets_the_registrys_settings_and_a_pin(checkout: Path, models_folder: Path):
    copy = models_folder / "my-smollm.gguf"

    output = parley(checkout, "add-llm", "transformers-lm-copy", "--model", str(copy))

    assert f"my-smollm.gguf: recognised by its sha256 ({EMBEDDED_SHA256[:12]}…) as SmolLM2-135M-Instruct" in output
    model = load_card(checkout / "components/transformers-lm-copy.yml").model
    assert model.sha256 == EMBEDDED_SHA256 and model.family == "smollm2"
    assert (model.context_length, model.stop, model.gguf_weights) == (2048, ["<|im_end|>"], "bf16")
    assert model.generation_config == {"max_new_tokens": 64, "min_new_tokens": 1, "do_sample": False, "num_return_sequences": 1}
    assert model.derived.guessed == []
    served = environment(checkout, "transformers-lm-copy")
    assert served["SERVED_MODEL_NAME"] == "transformers-lm-copy"
    assert (served["CONTEXT_LENGTH"], served["GGUF_WEIGHTS"], served["MODEL_SHA256"]) == ("2048", "bf16", EMBEDDED_SHA256)
    assert json.loads(served["STOP_SEQUENCES"]) == ["<|im_end|>"]
    assert parley(checkout, "check", "--no-tools") == "ok: the bundle is consistent\n"


def test_scan_adds_each_model_of_a_folder_recognised_or_read_from_its_files(checkout: Path, models_folder: Path):
    write_tiny_gguf(models_folder / "nested" / "Tiny Chat.gguf")

    output = parley(checkout, "add-llm", "--scan", str(models_folder))

    assert "transformers-lm-my-smollm: my-smollm.gguf: recognised by its sha256" in output
    assert "transformers-lm-tiny-chat: Tiny Chat.gguf: not in models/known.yml (sha256 " in output
    assert load_card(checkout / "components/transformers-lm-my-smollm.yml").model.context_length == 2048
    tiny = load_card(checkout / "components/transformers-lm-tiny-chat.yml")
    assert tiny.model.stop == ["</s>"] and tiny.model.derived.context_window == 2048
    assert parley(checkout, "check", "--no-tools") == "ok: the bundle is consistent\n"


def test_scanning_the_folder_again_skips_what_cards_serve_and_changes_nothing(checkout: Path, models_folder: Path):
    parley(checkout, "add-llm", "--scan", str(models_folder))

    again = parley(checkout, "add-llm", "--scan", str(models_folder))

    assert f"skipped {models_folder / 'my-smollm.gguf'}: already served by components/transformers-lm-my-smollm.yml" in again
    assert "nothing to change" in again


def test_an_unknown_file_gets_what_its_files_say_and_a_line_naming_what_was_guessed(checkout: Path, tmp_path: Path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=32768)

    output = parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(model))

    assert "tiny.gguf: not in models/known.yml" in output
    assert (
        "guessed (check them in the card): context_length 4096 (the model's window is 32768; --context-length sets it); "
        "generation_config common/generative_configs/default_generative_config.json; prompt_format Dream's plain"
    ) in output
    card = load_card(checkout / "components/transformers-lm-tiny.yml")
    assert card.model.derived.guessed == ["context_length", "generation_config", "prompt_format"]
    assert card.model.sha256 == file_sha256(model)


def test_add_llm_refuses_a_context_above_the_window_and_a_ram_usage_below_the_estimate(checkout: Path):
    too_long = parley(checkout, "add-llm", "transformers-lm-smollm2", "--context-length", "9000", code=1)
    too_small = parley(checkout, "add-llm", "transformers-lm-smollm2", "--ram-usage", "512M", code=1)

    assert "--context-length 9000 is above the model's window of 8192 tokens" in too_long
    assert "--ram-usage 512M is below the model's estimated need, 1.5 GiB on llama_cpp" in too_small


# --- parley check against the model -------------------------------------------------------------


def test_check_catches_a_pinned_file_that_changed(checkout: Path, models_folder: Path):
    copy = models_folder / "my-smollm.gguf"
    parley(checkout, "add-llm", "transformers-lm-copy", "--model", str(copy))
    with open(copy, "r+b") as stream:
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last[0] ^ 1]))

    output = parley(checkout, "check", "--no-tools", code=1)

    assert f"components/transformers-lm-copy.yml: model.sha256: pins {EMBEDDED_SHA256}, but {copy} has sha256 " in output


def test_check_catches_a_context_longer_than_the_models_window(checkout: Path):
    edit(checkout, SHIPPED, "context_length: 2048", "context_length: 16384")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (
        "components/transformers-lm-smollm2.yml: model.context_length: 16384 is above the model's window of 8192 tokens"
    ) in output


def test_check_catches_a_stop_set_without_the_models_eos(checkout: Path):
    edit(checkout, SHIPPED, "  stop:\n    - <|im_end|>\n", "  stop: []\n")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: model.stop: misses the model's end-of-generation token(s) '<|im_end|>'" in output


def test_check_catches_a_template_whose_end_of_an_answer_nothing_stops_at(checkout: Path):
    layout = '  prompt_format:\n    user: "<|user|>{instruction}\\n"\n    assistant: "<|assistant|>{instruction}<|end|>\\n"\n'
    edit(checkout, SHIPPED, "  prompt_format:\n", layout)

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (
        "components/transformers-lm-smollm2.yml: model.stop: model.prompt_format.assistant ends an answer with '<|end|>', "
        "which is no EOS token of the model and not in model.stop"
    ) in output


def test_check_catches_a_named_variants_template_that_nothing_stops(checkout: Path):
    names = '  names:\n    chatty:\n      prompt_format:\n        assistant: "{instruction}[END]\\n"\n'
    edit(checkout, SHIPPED, "  names: {}\n", names)

    output = parley(checkout, "check", "--no-tools", code=1)

    assert "components/transformers-lm-smollm2.yml: model.names.chatty.stop: model.names.chatty.prompt_format.assistant ends an answer with '[END]'" in output


def test_check_catches_a_model_without_any_eos_source(checkout: Path, tmp_path: Path):
    from parley.cards import parse_card
    from parley.model_fit import card_model_problems
    from common.model_facts import read_model_facts

    model = write_tiny_gguf(tmp_path / "no-eos.gguf", eos=False)
    data = YAML(typ="safe").load((checkout / SHIPPED).read_text())
    data["model"].update({"stop": [], "prompt_format": {"user": "{instruction}\n"}})

    problems = card_model_problems(parse_card(data, SHIPPED), read_model_facts(model))

    assert any("declares no end-of-generation token and the card has no stop strings" in problem for problem in problems)


def test_check_catches_a_ram_usage_below_the_models_estimated_need(checkout: Path):
    edit(checkout, SHIPPED, "ram_usage: 1536M", "ram_usage: 512M")
    parley(checkout, "generate")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (
        "components/transformers-lm-smollm2.yml: ram_usage: 512M is below the model's estimated need, 1.5 GiB on "
        "llama_cpp: weights 257 MiB + KV cache 720 MiB (16 slots × 2048 tokens × 22 KiB) + runtime 512 MiB"
    ) in output
    assert f"{OVERRIDE}: services.transformers-lm-smollm2.deploy.resources.limits.memory: 512M is below" in output


def test_check_catches_a_compose_memory_limit_below_the_estimate(checkout: Path):
    edit(checkout, OVERRIDE, "          memory: 1536M", "          memory: 1G")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (
        f"{OVERRIDE}: services.transformers-lm-smollm2.deploy.resources.limits.memory: 1G is below the model's "
        "estimated need, 1.5 GiB on llama_cpp"
    ) in output


def test_check_catches_derived_values_edited_by_hand(checkout: Path):
    edit(checkout, SHIPPED, "    context_window: 8192", "    context_window: 32768")

    output = parley(checkout, "check", "--no-tools", code=1)

    assert (
        "components/transformers-lm-smollm2.yml: model.derived.context_window: 32768, but the model's files say 8192; "
        "run `parley add-llm transformers-lm-smollm2` to refresh it"
    ) in output


# --- parley list ----------------------------------------------------------------------------------

LIST_FIELDS = {
    "name", "kind", "source", "sha256", "backend", "quantization", "context_length", "ram_estimate", "port",
    "distributions", "names", "aliases",
}


def test_list_json_gives_every_field_of_every_llm(checkout: Path, models_folder: Path):
    parley(checkout, "add-llm", "transformers-lm-copy", "--model", str(models_folder / "my-smollm.gguf"))
    parley(checkout, "add-llm", "openai-api-mini", "--api", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "mini")

    rows = {row["name"]: row for row in json.loads(parley(checkout, "list", "--json"))}

    assert sorted(rows) == ["openai-api-mini", "transformers-lm-copy", "transformers-lm-smollm2"]
    assert all(LIST_FIELDS <= set(row) for row in rows.values())
    shipped = rows["transformers-lm-smollm2"]
    assert shipped["kind"] == "transformers" and shipped["source"] == DEFAULT_MODEL_NAME
    assert shipped["sha256"] == EMBEDDED_SHA256 and shipped["backend"] == "llama_cpp"
    assert (shipped["quantization"], shipped["runs_as"], shipped["context_length"]) == ("Q4_1", "BF16", 2048)
    assert shipped["ram_estimate"] == 269030016 + 2 * 30 * 3 * 64 * 2 * 2048 * 16 + 512 * 2**20
    assert (shipped["ram_usage"], shipped["port"], shipped["distributions"]) == ("1536M", 8180, ALL_DISTS)
    assert shipped["names"] == ["transformers-lm-smollm2", "SmolLM2-135M-Instruct"]
    assert rows["transformers-lm-copy"]["sha256"] == EMBEDDED_SHA256
    assert (rows["openai-api-mini"]["kind"], rows["openai-api-mini"]["backend"]) == ("openai", "openai upstream")


def test_list_prints_a_table_with_a_short_sha256_and_the_memory(checkout: Path):
    header, row = parley(checkout, "list").splitlines()

    assert header.split() == ["name", "kind", "source", "sha256", "backend", "quant", "context", "RAM", "est", "/", "limit",
                              "port", "distributions", "names"]
    assert row.split() == ["transformers-lm-smollm2", "transformers", DEFAULT_MODEL_NAME, EMBEDDED_SHA256[:12], "llama_cpp",
                           "Q4_1→BF16", "2048", "1.5GiB", "/", "1.5GiB", "8180", ",".join(ALL_DISTS),
                           "transformers-lm-smollm2,SmolLM2-135M-Instruct"]


def test_list_dist_shows_only_that_distributions_llms(checkout: Path, tmp_path: Path):
    other = checkout / "assistant_dists" / "other"
    other.mkdir()
    (other / "docker-compose.override.yml").write_text("services: {}\n")
    parley(checkout, "add-llm", "transformers-lm-tiny", "--model", str(write_tiny_gguf(tmp_path / "tiny.gguf")), "--dist", "other")

    in_other = json.loads(parley(checkout, "list", "--json", "--dist", "other"))
    in_default = json.loads(parley(checkout, "list", "--json", "--dist", DIST))

    assert [row["name"] for row in in_other] == ["transformers-lm-tiny"]
    assert [row["name"] for row in in_default] == ["transformers-lm-smollm2"]
    assert "--dist 'nowhere': no assistant_dists/nowhere" in parley(checkout, "list", "--dist", "nowhere", code=1)


# --- parley up and the machine's memory ----------------------------------------------------------------


def test_up_refuses_before_starting_anything_a_distribution_larger_than_the_machine(checkout: Path):
    edit(checkout, SHIPPED, "ram_usage: 1536M", "ram_usage: 65536G")
    parley(checkout, "generate")

    output = parley(checkout, "up", "--free-ports", code=1)

    assert f"{DIST} needs 64 TiB" not in output  # sizes are in GiB
    assert f"Error: {DIST} needs 65536 GiB (the memory limits of its services), but this machine has " in output
    lines = output.splitlines()
    assert "  transformers-lm-smollm2: 65536 GiB" in lines
    assert "  agent: 256 MiB" in lines and "  prompted-skill: 256 MiB" in lines
    assert "--skip-memory-check" in output
    assert "PARLEY_SERVICE" not in output


def test_available_memory_is_memavailable_lowered_to_the_cgroups_room(tmp_path: Path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:    8000000 kB\n")
    (proc / "self" / "cgroup").write_text("0::/box\n")
    cgroup = tmp_path / "cgroup" / "box"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(f"{4 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")

    found = available_memory(proc, tmp_path / "cgroup")

    assert found.bytes == 3 * 2**30 and "cgroup" in found.source
    (cgroup / "memory.max").write_text("max\n")
    assert available_memory(proc, tmp_path / "cgroup").bytes == 8000000 * 1024


def test_this_machine_reports_its_available_memory():
    found = available_memory()

    assert found is not None and found.bytes > 0
