"""The LLM service's own logic, in process, on a tiny randomly initialised model the tests build.

Prompt construction (plain, chat template, prompt_format), config merging and caps, validation of
every bad input, truncation, stop handling and the model's lifecycle behind /health. The behaviour
users see on the real model is in test_transformers_lm_service.py.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import torch
from support.errors import assert_dream_error
from support.tiny_model import tiny_model_dir

from common.lm_protocol import GenerationCaps, GenerationConfig, RespondRequest
from common.validation import RequestValidationError, parse_json
from common.model_sources import resolve_model_source
from services.transformers_lm.app import create_app, load_model
from services.transformers_lm.backends import (
    Backend,
    BackendRegistry,
    ChatMessage,
    LoadOptions,
    ModelLoadError,
    default_registry,
)
from services.transformers_lm.backends.transformers_backend import TransformersBackend
from services.transformers_lm.engines import GenerationRequest, SamplingParams
from services.transformers_lm.engines.sampling import next_token
from services.transformers_lm.prompting import (
    ChatTemplateRenderer,
    IncrementalDetokenizer,
    PlainRenderer,
    PromptBuilder,
    PromptFormatRenderer,
    conversation_from_dream,
    conversation_from_messages,
)
from services.transformers_lm.service import choose_renderer
from services.transformers_lm.settings import PromptFormat, Settings, SettingsError



@pytest.fixture(scope="module")
def tiny_model():
    model = TransformersBackend().load(resolve_model_source(str(tiny_model_dir())), LoadOptions(device="cpu"))
    yield model
    model.close()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(pretrained_model_name_or_path="tiny", max_new_tokens_cap=200, max_num_return_sequences=4)


@pytest.fixture(scope="module")
def client(tiny_model, settings):
    return create_app(settings, tiny_model).test_client()


def respond_body(**overrides) -> dict:
    body = {"dialog_contexts": [["Hi there!"]], "prompts": ["You are kind."], "configs": [{"max_new_tokens": 4}]}
    body.update(overrides)
    return body


# --- prompt construction ----------------------------------------------------------------------


def test_dream_dialog_alternates_roles_so_that_the_last_utterance_is_the_users():
    conversation = conversation_from_dream("Be brief.", ["a", "b", "c", "d"])

    assert [turn.role for turn in conversation.turns] == ["assistant", "user", "assistant", "user"]
    assert conversation.system == "Be brief."


def test_plain_format_is_dreams_prompt_then_speaker_lines_ending_with_the_bots_name():
    text = PlainRenderer("EN").render(conversation_from_dream("You are a bot.", ["Hi", "Hello!", "How are you?"]))

    assert text == "You are a bot.\nHuman: Hi\nAI: Hello!\nHuman: How are you?\nAI:"


def test_plain_format_uses_dreams_russian_speaker_names_for_language_ru():
    text = PlainRenderer("RU").render(conversation_from_dream("", ["Привет", "Здравствуйте!", "Как дела?"]))

    assert text == "Human: Привет\nAssistant: Здравствуйте!\nHuman: Как дела?\nAssistant:"


def test_prompt_format_in_the_settings_lays_out_the_prompt_instead_of_the_chat_template(tiny_model):
    layout = PromptFormat(user="U: {instruction}\n", assistant="A: {instruction}\n", trailing_assistant="A:")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    with_format = create_app(Settings(pretrained_model_name_or_path="tiny", prompt_format=layout), tiny_model).test_client()
    with_template = create_app(Settings(pretrained_model_name_or_path="tiny"), tiny_model).test_client()

    prompt_tokens = with_format.post("/v1/chat/completions", json=chat).get_json()["usage"]["prompt_tokens"]

    assert prompt_tokens == len(tiny_model.encode("U: Hi\nA:"))
    assert with_format.get("/health").get_json()["prompt_style"] == "prompt_format"
    assert with_template.get("/health").get_json()["prompt_style"] == "chat_template"


def test_without_a_chat_template_language_ru_gives_dreams_russian_plain_format():
    model_without_template = SimpleNamespace(has_chat_template=False)

    renderer = choose_renderer(model_without_template, Settings(language="RU"))

    assert renderer.render(conversation_from_dream("", ["Привет"])) == "Human: Привет\nAssistant:"


def test_stop_sequences_in_the_settings_cut_every_answer(tiny_model):
    body = {"dialog_contexts": [["Hi there!"]], "configs": [{"max_new_tokens": 24, "do_sample": False, "num_return_sequences": 1}]}
    free = create_app(Settings(pretrained_model_name_or_path="tiny"), tiny_model).test_client()
    text = free.post("/respond", json=body).get_json()[0][0]
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text

    settings = Settings(pretrained_model_name_or_path="tiny", stop_sequences=(stop,))
    cut = create_app(settings, tiny_model).test_client().post("/respond", json=body).get_json()[0][0]

    assert cut == text[: text.index(stop)].strip()


def test_chat_template_puts_the_prompt_in_the_system_message(tiny_model):
    renderer = ChatTemplateRenderer(tiny_model.render_chat)

    text = renderer.render(conversation_from_dream("You are kind.", ["Hi", "Hello!", "Bye"]))

    assert text == (
        "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_leaves_the_system_message_out_when_there_is_no_prompt(tiny_model):
    text = ChatTemplateRenderer(tiny_model.render_chat).render(conversation_from_dream("", ["Hi"]))

    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_format_override_follows_rayllm_fields_with_the_system_message_in_the_first_user_turn():
    layout = PromptFormat(
        system="<<SYS>>{instruction}<</SYS>>",
        user="[INST] {system}{instruction} [/INST]",
        assistant=" {instruction} </s>",
        trailing_assistant=" ",
        system_in_user=True,
    )

    text = PromptFormatRenderer(layout).render(conversation_from_dream("  Be kind. ", ["Hi", "Hello", "Bye"]))

    assert text == "[INST] <<SYS>>Be kind.<</SYS>>Hi [/INST] Hello </s>[INST] Bye [/INST] "


def test_prompt_format_uses_its_default_system_message_when_the_dialog_has_no_prompt():
    layout = PromptFormat(system="SYSTEM: {instruction}\n", user="USER: {instruction}\n", assistant="BOT: {instruction}\n",
                          trailing_assistant="BOT:", default_system_message="Be helpful.")

    renderer = PromptFormatRenderer(layout)

    assert renderer.render(conversation_from_dream("", ["Hi"])) == "SYSTEM: Be helpful.\nUSER: Hi\nBOT:"
    assert renderer.turn_boundaries() == ("USER:", "BOT:")


def test_openai_system_messages_become_the_system_prompt():
    conversation = conversation_from_messages(
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"),
         ChatMessage("user", "Bye")]
    )

    assert conversation.system == "Be brief."
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user"]


# --- truncation -------------------------------------------------------------------------------


def test_a_dialog_longer_than_the_window_loses_its_oldest_utterances_and_keeps_the_prompt(tiny_model):
    # The tiny tokenizer is byte-level: one token per byte, so lengths are easy to reason about.
    builder = PromptBuilder(PlainRenderer("EN"), tiny_model.encode, context_length=80)
    utterances = [f"utterance number {i}" for i in range(6)]

    built = builder.build(conversation_from_dream("PROMPT", utterances), max_new_tokens=10)

    assert built.dropped_turns > 0
    assert len(built.token_ids) <= 70
    assert built.text.startswith("PROMPT\n")
    assert built.text.endswith("Human: utterance number 5\nAI:")
    assert "utterance number 0" not in built.text


def test_context_length_lowers_the_window_and_a_long_dialog_is_answered_from_its_latest_turns():
    settings = Settings(pretrained_model_name_or_path=str(tiny_model_dir()), device="cpu", context_length=96)
    model = load_model(settings)
    try:
        client = create_app(settings, model).test_client()
        long_dialog = [f"utterance number {i}" for i in range(30)]  # ~600 byte-level tokens
        greedy = {"max_new_tokens": 4, "num_return_sequences": 1, "do_sample": False}

        response = client.post("/respond", json={"dialog_contexts": [long_dialog], "configs": [greedy]})

        assert model.info.context_length == 96
        assert client.get("/health").get_json()["context_length"] == 96
        assert response.status_code == 200
        assert len(response.get_json()[0]) == 1
    finally:
        model.close()


def test_a_last_utterance_that_cannot_fit_the_window_is_a_400_naming_the_dialog(tiny_model):
    builder = PromptBuilder(PlainRenderer("EN"), tiny_model.encode, context_length=40)

    with pytest.raises(RequestValidationError) as caught:
        builder.build(conversation_from_dream("", ["x" * 100]), max_new_tokens=10, field="dialog_contexts[0]")

    assert caught.value.field == "dialog_contexts[0]"


# --- stop handling ----------------------------------------------------------------------------


def _detokenize(tiny_model, text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    pieces = IncrementalDetokenizer(tiny_model.decode, stops)
    streamed = "".join(pieces.add(token) for token in tiny_model.encode(text))
    streamed += pieces.finish()
    return streamed, pieces.text, pieces.stopped


def test_text_is_cut_where_the_model_starts_the_next_speakers_turn(tiny_model):
    stops = PlainRenderer("EN").turn_boundaries()

    streamed, text, stopped = _detokenize(tiny_model, " Fine, thanks!\nHuman: and you?", stops)

    assert (streamed, text, stopped) == (" Fine, thanks!", " Fine, thanks!", True)


def test_text_that_may_begin_a_stop_sequence_is_held_back_until_decided(tiny_model):
    pieces = IncrementalDetokenizer(tiny_model.decode, ("STOP",))
    sent = [pieces.add(token) for token in tiny_model.encode("abST")]

    assert "".join(sent) == "ab"  # "ST" may start "STOP"
    assert pieces.add(tiny_model.encode("x")[0]) == "STx"


def test_multibyte_characters_are_never_split_across_pieces(tiny_model):
    streamed, text, _ = _detokenize(tiny_model, "Привет, мир", ())

    assert streamed == text == "Привет, мир"


# --- configs ----------------------------------------------------------------------------------


def test_a_requests_config_is_merged_over_the_models_default():
    default = GenerationConfig(max_new_tokens=120, temperature=0.9, do_sample=True, num_return_sequences=2)

    merged = default.merged_with(GenerationConfig.model_validate({"temperature": 0.2}))

    assert (merged.max_new_tokens, merged.temperature, merged.do_sample, merged.num_return_sequences) == (120, 0.2, True, 2)


def test_caps_reject_a_config_asking_for_more_than_the_deployment_allows():
    config = GenerationConfig(max_new_tokens=5000)

    with pytest.raises(RequestValidationError) as caught:
        config.check_caps(GenerationCaps(max_new_tokens=1024), "configs[0]")

    assert caught.value.field == "configs[0].max_new_tokens"


def test_the_default_config_file_gives_two_sampled_hypotheses(client):
    response = client.post("/respond", json={"dialog_contexts": [["Hi"]], "configs": [{"max_new_tokens": 3}]})

    assert response.status_code == 200
    assert len(response.get_json()[0]) == 2


def test_num_return_sequences_gives_that_many_hypotheses_per_dialog(client):
    body = respond_body(
        dialog_contexts=[["Hi"], ["Hello", "Hey", "Bye"]],
        prompts=["", "Be kind."],
        configs=[{"max_new_tokens": 3, "num_return_sequences": 3}, None],
    )

    hypotheses = client.post("/respond", json=body).get_json()

    assert [len(h) for h in hypotheses] == [3, 2]
    assert all(isinstance(text, str) for texts in hypotheses for text in texts)


def test_the_same_seed_gives_the_same_sampled_hypotheses(client):
    config = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "seed": 7, "num_return_sequences": 2}
    body = respond_body(configs=[config])

    first = client.post("/respond", json=body).get_json()
    second = client.post("/respond", json=body).get_json()

    assert first == second


def test_configs_and_prompts_may_be_left_out_as_in_dream(client):
    response = client.post("/respond", json={"dialog_contexts": [["Hi"]]})

    assert response.status_code == 200
    assert len(response.get_json()) == 1


# --- sampling -----------------------------------------------------------------------------------


def _pick(logits: list[float], generated: list[int], **penalties: float) -> int:
    return next_token(
        torch.tensor(logits),
        SamplingParams(max_new_tokens=1, **penalties),
        None,
        torch.Generator(),
        forbid_stop_tokens=False,
        generated_token_ids=torch.tensor(generated, dtype=torch.long),
    )


def test_openai_penalties_lower_a_tokens_logit_per_time_it_was_generated_and_once_for_being_there():
    logits = [3.0, 2.0, 1.5, -5.0]
    generated = [0, 1, 0]  # token 0 twice, token 1 once, token 2 never

    assert _pick(logits, generated) == 0
    # 3 - 2 * 0.5 - 0.2 = 1.8 still beats 2 - 0.5 - 0.2 = 1.3 and 1.5
    assert _pick(logits, generated, frequency_penalty=0.5, presence_penalty=0.2) == 0
    # 3 - 2 * 0.7 - 0.2 = 1.4 and 2 - 0.7 - 0.2 = 1.1 now lose to the untouched 1.5
    assert _pick(logits, generated, frequency_penalty=0.7, presence_penalty=0.2) == 2
    # presence counts once however often: 3 - 1.2 = 1.8 beats 2 - 1.2 = 0.8 and 1.5
    assert _pick(logits, generated, presence_penalty=1.2) == 0
    # a negative penalty favours what was generated: 2 + 1.5 = 3.5 beats 3
    assert _pick(logits, [1], presence_penalty=-1.5) == 1
    # the prompt's tokens do not count: nothing generated, nothing penalised
    assert _pick(logits, [], frequency_penalty=2.0, presence_penalty=2.0) == 0


# --- bad input: a 4xx naming the field, never a 500 or an empty 200 -----------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"prompts": ["x"]}, "dialog_contexts", id="missing dialog_contexts"),
        pytest.param({"dialog_contexts": "Hi"}, "dialog_contexts", id="dialog_contexts not a list"),
        pytest.param({"dialog_contexts": [["Hi", 5]]}, "dialog_contexts[0][1]", id="utterance not a string"),
        pytest.param({"dialog_contexts": []}, "dialog_contexts", id="no dialogs"),
        pytest.param({"dialog_contexts": [[]]}, "dialog_contexts[0]", id="empty dialog"),
        pytest.param(respond_body(prompts=["a", "b"]), "prompts", id="prompts of another length"),
        pytest.param(respond_body(configs=[{}, {}]), "configs", id="configs of another length"),
        pytest.param(respond_body(prompts=[3]), "prompts[0]", id="prompt not a string"),
        pytest.param(respond_body(configs=[{"beams": 3}]), "configs[0].beams", id="unknown generation key"),
        pytest.param(respond_body(configs=[{"max_new_tokens": "5"}]), "configs[0].max_new_tokens", id="string number"),
        pytest.param(respond_body(configs=[{"max_new_tokens": 0}]), "configs[0].max_new_tokens", id="zero tokens"),
        pytest.param(respond_body(configs=[{"temperature": -0.5}]), "configs[0].temperature", id="negative temperature"),
        pytest.param(respond_body(configs=[{"top_p": 1.5}]), "configs[0].top_p", id="top_p above 1"),
        pytest.param(respond_body(configs=[{"num_return_sequences": 5}]), "configs[0].num_return_sequences",
                     id="num_return_sequences above cap"),
        pytest.param(respond_body(configs=[{"do_sample": "yes"}]), "configs[0].do_sample", id="do_sample not bool"),
        pytest.param(respond_body(configs=["greedy"]), "configs[0]", id="config not an object"),
        pytest.param(respond_body(extra=1), "extra", id="unknown top-level key"),
    ],
)
def test_bad_respond_input_is_a_400_naming_the_field(client, body, field):
    error = assert_dream_error(client.post("/respond", json=body), 400, field)

    assert field.split("[")[0].split(".")[0] in error["message"]


def test_a_dream_config_above_the_cap_is_answered_within_it_and_an_openai_request_is_refused(client):
    # Dream's shipped configs ask 2048 or 4096 new tokens of whatever model they are sent to: a most.
    rendered = client.post("/render", json=respond_body(configs=[{"max_new_tokens": 5000}]))
    refused = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 201})

    assert rendered.status_code == 200, rendered.get_json()
    assert rendered.get_json()["rendered"][0]["generation_config"]["max_new_tokens"] == 200  # the cap
    assert refused.status_code == 400 and refused.get_json()["error"]["param"] == "max_tokens"


def test_malformed_json_is_a_400(client):
    assert_dream_error(client.post("/respond", data=b'{"dialog_contexts": [', content_type="application/json"), 400)


def test_json_nested_too_deeply_to_parse_is_a_400(client):
    assert_dream_error(client.post("/respond", data=b"[" * 100_000, content_type="application/json"), 400)


def test_a_json_body_that_is_not_an_object_is_a_400(client):
    assert_dream_error(client.post("/respond", json=[["Hi"]]), 400)


def test_a_body_over_the_size_limit_is_a_413(tiny_model):
    small = Settings(pretrained_model_name_or_path="tiny", max_request_bytes=2048)
    client = create_app(small, tiny_model).test_client()

    response = client.post("/respond", json={"dialog_contexts": [["x" * 5000]]})

    error = assert_dream_error(response, 413)
    assert "MAX_REQUEST_BYTES" in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "prompts", id="missing prompts"),
        pytest.param({"prompts": ["a"], "configs": [None, None]}, "configs", id="configs of another length"),
        pytest.param({"prompts": ["a"], "configs": [{"top_k": -1}]}, "configs[0].top_k", id="negative top_k"),
    ],
)
def test_bad_generate_goals_input_is_a_400_naming_the_field(client, body, field):
    assert_dream_error(client.post("/generate_goals", json=body), 400, field)


def test_generate_goals_answers_one_string_per_prompt(client):
    response = client.post(
        "/generate_goals", json={"prompts": ["You sell shoes.", "You teach maths."], "configs": [{"max_new_tokens": 5}] * 2}
    )

    assert response.status_code == 200
    assert [type(goal) for goal in response.get_json()] == [str, str]


def test_an_unknown_route_is_a_404_in_the_dream_shape(client):
    assert_dream_error(client.post("/nope", json={}), 404)


# --- failures inside generation -----------------------------------------------------------------


def test_a_failure_inside_generation_is_a_500_and_the_next_request_is_served(tiny_model, settings, caplog):
    client = create_app(settings, tiny_model).test_client()
    real_forward = tiny_model.model.forward
    failures = iter([RuntimeError("simulated device failure")])

    def failing_once(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_forward(*args, **kwargs)

    tiny_model.model.forward = failing_once
    try:
        failed = client.post("/respond", json=respond_body(configs=[{"max_new_tokens": 3, "num_return_sequences": 1}]))
        served = client.post("/respond", json=respond_body(configs=[{"max_new_tokens": 3, "num_return_sequences": 1}]))
    finally:
        del tiny_model.model.forward

    assert_dream_error(failed, 500)
    assert served.status_code == 200 and len(served.get_json()[0]) == 1
    assert any("POST /respond failed" in record.getMessage() and record.exc_info for record in caplog.records)


def test_a_full_generation_queue_is_a_429_with_retry_after(settings):
    options = LoadOptions(device="cpu", max_batch_size=1, max_queue_size=1)
    model = TransformersBackend().load(resolve_model_source(str(tiny_model_dir())), options)
    client = create_app(settings, model).test_client()
    long_request = GenerationRequest((5, 6, 7), SamplingParams(max_new_tokens=4000))
    running = model.engine.submit(long_request)
    next(iter(running))  # it holds the only batch slot now
    waiting = model.engine.submit(long_request)  # and this one the only place in the queue
    try:
        dream = client.post("/respond", json=respond_body())
        openai_style = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    finally:
        running.cancel()
        waiting.cancel()
        model.close()

    assert_dream_error(dream, 429)
    assert int(dream.headers["Retry-After"]) >= 1
    assert openai_style.status_code == 429 and openai_style.get_json()["error"]["code"] == "queue_full"


# --- the model's lifecycle ------------------------------------------------------------------------


class _GatedBackend(Backend):
    """Loads the tiny model only once the test opens the gate, so the loading state can be observed."""

    name = "gated"
    gate = threading.Event()
    fail_with: str | None = None

    def load(self, source, options):
        self.gate.wait(timeout=30)
        if self.fail_with:
            raise ModelLoadError(self.fail_with)
        return TransformersBackend().load(resolve_model_source(str(tiny_model_dir())), options)


def _gated_registry() -> BackendRegistry:
    registry = default_registry()
    registry.register(_GatedBackend)
    return registry


def test_health_is_503_until_the_model_is_loaded_and_warmed_up_then_200_with_its_details(settings):
    _GatedBackend.gate.clear()
    _GatedBackend.fail_with = None
    gated = settings.model_copy(update={"backend": "gated", "pretrained_model_name_or_path": str(tiny_model_dir())})
    app = create_app(gated, registry=_gated_registry(), on_load_failure=lambda message: None)
    client = app.test_client()

    loading = client.get("/health")
    early = client.post("/respond", json=respond_body())
    _GatedBackend.gate.set()
    app.extensions["lm_service"].ready.wait(timeout=60)
    ready = client.get("/health")

    assert loading.status_code == 503 and loading.get_json()["status"] == "loading"
    assert_dream_error(early, 503)
    assert ready.status_code == 200
    assert {k: ready.get_json()[k] for k in ("status", "backend", "device", "dtype", "context_length")} == {
        "status": "ok", "backend": "transformers", "device": "cpu", "dtype": "float32", "context_length": 4096,
    }
    app.extensions["lm_service"].get().model.close()


def test_a_model_that_fails_to_load_reports_one_line_and_health_stays_503(settings):
    _GatedBackend.gate.set()
    _GatedBackend.fail_with = "no such model: set PRETRAINED_MODEL_NAME_OR_PATH"
    reported: list[str] = []
    gated = settings.model_copy(update={"backend": "gated", "pretrained_model_name_or_path": str(tiny_model_dir())})
    app = create_app(gated, registry=_gated_registry(), on_load_failure=reported.append)
    app.extensions["lm_service"].ready.wait(timeout=30)

    health = app.test_client().get("/health")
    ping = app.test_client().post("/ping")

    assert reported == ["no such model: set PRETRAINED_MODEL_NAME_OR_PATH"]
    assert health.status_code == 503 and health.get_json()["status"] == "failed"
    assert "failed to load" in assert_dream_error(ping, 503)["message"]


def test_ping_is_503_while_loading_and_pong_once_the_model_serves(settings):
    _GatedBackend.gate.clear()  # the model's load waits until the test opens the gate
    _GatedBackend.fail_with = None
    gated = settings.model_copy(update={"backend": "gated", "pretrained_model_name_or_path": str(tiny_model_dir())})
    app = create_app(gated, registry=_gated_registry(), on_load_failure=lambda message: None)
    client = app.test_client()

    while_loading = (client.get("/ping"), client.post("/ping"))
    _GatedBackend.gate.set()
    app.extensions["lm_service"].ready.wait(timeout=60)
    once_ready = (client.get("/ping"), client.post("/ping"))

    for ping in while_loading:
        assert "still loading" in assert_dream_error(ping, 503)["message"]
    assert [(p.status_code, p.get_json()) for p in once_ready] == [(200, "pong"), (200, "pong")]
    app.extensions["lm_service"].get().model.close()


# --- backends -----------------------------------------------------------------------------------


def test_auto_backend_serves_a_directory_with_transformers():
    source = resolve_model_source(str(tiny_model_dir()))

    assert default_registry().choose("auto", source) is TransformersBackend


def test_auto_backend_falls_back_to_transformers_for_gguf_when_no_native_gguf_backend_is_available():
    registry = BackendRegistry()
    registry.register(TransformersBackend)

    class Unavailable(Backend):
        name = "llama_cpp"
        loads_gguf_natively = True

        @classmethod
        def is_available(cls):
            return False

        def load(self, source, options):
            raise AssertionError("not importable, never chosen")

    registry.register(Unavailable)

    assert registry.choose("auto", resolve_model_source("smollm2-135m-instruct")) is TransformersBackend


def test_an_unknown_backend_is_a_load_error_listing_the_known_ones():
    with pytest.raises(ModelLoadError, match="transformers"):
        default_registry().choose("vllm", resolve_model_source(str(tiny_model_dir())))


def test_additional_eos_tokens_end_generation_when_one_token_and_cut_the_text_otherwise():
    options = LoadOptions(device="cpu", additional_eos_tokens=("<|endoftext|>", "\nHuman:"))
    model = TransformersBackend().load(resolve_model_source(str(tiny_model_dir())), options)
    try:
        endoftext = model.tokenizer.token_id("<|endoftext|>")
        assert endoftext in model.info.eos_token_ids
        assert model.info.extra_stop_sequences == ("\nHuman:",)
    finally:
        model.close()


def test_half_precision_on_cpu_loads_bfloat16():
    options = LoadOptions(device="cpu", half_precision=True)
    model = TransformersBackend().load(resolve_model_source(str(tiny_model_dir())), options)
    try:
        assert model.info.dtype == "bfloat16"
        assert model.model.dtype == torch.bfloat16
    finally:
        model.close()


def test_a_sha256_pin_that_does_not_match_refuses_to_load():
    settings = Settings(pretrained_model_name_or_path=str(tiny_model_dir()), model_sha256="0" * 64, backend="transformers")

    with pytest.raises(ModelLoadError, match="refusing to start"):
        load_model(settings)


def test_a_missing_model_path_is_a_one_line_load_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(Settings(pretrained_model_name_or_path="./no/such/model.gguf"))


# --- settings -----------------------------------------------------------------------------------


def test_settings_are_read_from_the_environment_by_dreams_names():
    settings = Settings.from_env(
        {
            "PRETRAINED_MODEL_NAME_OR_PATH": "some/model",
            "HALF_PRECISION": "1",
            "ADDITIONAL_EOS_TOKENS": "<|end|>, Human:",
            "LANGUAGE": "ru",
            "MODEL_ALIASES": "gpt-3.5-turbo,small",
            "STOP_SEQUENCES": '["\\nUser:"]',
            "PROMPT_FORMAT": '{"user": "U: {instruction}\\n", "trailing_assistant": "A:"}',
        }
    )

    assert settings.half_precision is True
    assert settings.additional_eos_tokens == ("<|end|>", "Human:")
    assert settings.language == "RU"
    assert settings.served_model_names == ["some/model", "gpt-3.5-turbo", "small"]
    assert settings.stop_sequences == ("\nUser:",)
    assert settings.prompt_format.trailing_assistant == "A:"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"HALF_PRECISION": "maybe"}, "HALF_PRECISION"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"SERVICE_PORT": "http"}, "SERVICE_PORT"),
        ({"STOP_SEQUENCES": "Human:"}, "STOP_SEQUENCES"),
        ({"PROMPT_FORMAT": '{"user": "no slot"}'}, "PROMPT_FORMAT"),
        ({"MODEL_SHA256": "abc"}, "MODEL_SHA256"),
    ],
)
def test_a_malformed_setting_is_an_error_naming_the_variable(environ, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(environ)



def test_parse_request_turns_each_dialog_into_one_item():
    request = parse_json(RespondRequest, {"dialog_contexts": [["a"], ["b", "c"]], "prompts": ["p", "q"]})

    assert [(i.dialog_context, i.prompt, i.config) for i in request.items()] == [(["a"], "p", None), (["b", "c"], "q", None)]


def test_the_generation_config_model_lists_every_allowed_key_in_its_error():
    with pytest.raises(RequestValidationError) as caught:
        parse_json(RespondRequest, respond_body(configs=[{"beams": 2}]))

    assert all(key in caught.value.message for key in json.loads(json.dumps(list(GenerationConfig.model_fields))))
