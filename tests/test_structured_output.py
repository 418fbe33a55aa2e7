"""Constrained decoding and tool calls, in process: the grammars, the reader of calls, the prompts, the engine.

Tier: plain functions and the tiny randomly initialised model the tests build (support/tiny_model.py)
with the real engine and real llguidance masks. A random model writes nonsense, so whatever it
writes under a grammar must still parse; that is the point. One test makes the model's forward
pass fail on purpose to see the stream's `error` event. The real model behind real HTTP is in
tests/test_openai_conformance.py.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from support.tiny_model import tiny_model_dir

from common.lm_protocol import ResponseFormat
from common.model_sources import resolve_model_source
from services.transformers_lm.app import create_app
from services.transformers_lm.backends import ChatMessage, ChatToolCall, LoadOptions
from services.transformers_lm.backends.chat_template import render_chat_template, template_takes_tools
from services.transformers_lm.backends.transformers_backend import TransformersBackend
from services.transformers_lm.engines import FinishReason, GenerationRequest, SamplingParams
from services.transformers_lm.engines.grammar import GrammarError
from services.transformers_lm.prompting import Conversation, conversation_from_messages, with_generic_tools
from services.transformers_lm.settings import Settings
from services.transformers_lm.structured_output import (
    ToolCallReader,
    ToolChoice,
    ToolFunction,
    grammar_source,
    read_tool_calls,
    strict_generation_schema,
)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
    "required": ["name", "tags"],
}
WEATHER = ToolFunction("get_weather", "The weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]})
CLOCK = ToolFunction("get_time", None, None)
TWO_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tiny_model():
    model = TransformersBackend().load(resolve_model_source(str(tiny_model_dir())), LoadOptions(device="cpu", max_batch_size=4))
    yield model
    model.close()


def json_schema_format(schema: dict) -> ResponseFormat:
    return ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def generate(model, grammar, max_new_tokens: int = 200, seed: int | None = None, prompt=(1, 2, 3)):
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens, do_sample=seed is not None, seed=seed, stop_token_ids=model.info.eos_token_ids
    )
    return model.engine.submit(GenerationRequest(tuple(prompt), sampling, grammar))


# --- the engine under a grammar ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_whatever_a_random_model_samples_under_a_schema_validates(tiny_model, seed):
    grammar = tiny_model.grammar_tokenizer().compile(grammar_source(json_schema_format(SCHEMA), None))

    stream = generate(tiny_model, grammar, seed=seed)
    text = tiny_model.decode(stream.collect())

    assert stream.finish_reason is FinishReason.STOP  # the grammar ended the row, not the length
    jsonschema.validate(json.loads(text), SCHEMA)


def test_rows_of_one_batch_follow_their_own_grammars_and_a_free_row_is_untouched(tiny_model):
    tokens = tiny_model.grammar_tokenizer()
    object_grammar = tokens.compile(grammar_source(json_schema_format(SCHEMA), None))
    call_grammar = tokens.compile(grammar_source(None, ToolChoice((WEATHER, CLOCK), "required")))
    alone = generate(tiny_model, None, max_new_tokens=12).collect()

    streams = [generate(tiny_model, object_grammar, seed=5), generate(tiny_model, call_grammar, seed=6), generate(tiny_model, None, max_new_tokens=12)]
    texts = [tiny_model.decode(stream.collect()) for stream in streams]

    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    reader = read_tool_calls(texts[1])
    assert reader.sent_calls and all(call.name in ("get_weather", "get_time") for call in reader.sent_calls)
    assert streams[2].request.grammar is None and tiny_model.decode(alone) == texts[2]


def test_a_schema_llguidance_cannot_compile_is_an_error_naming_the_keyword(tiny_model):
    source = grammar_source(json_schema_format({"type": "array", "uniqueItems": True}), None)

    with pytest.raises(GrammarError, match="uniqueItems"):
        tiny_model.grammar_tokenizer().compile(source)


def test_generation_schemas_forbid_properties_the_schema_does_not_name_where_it_says_nothing():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}}, "additionalProperties": True}

    strict = strict_generation_schema(schema)

    assert strict["additionalProperties"] is True  # said: kept
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]  # the caller's schema is not touched


# --- reading calls -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_streamed_call_deltas_join_to_the_calls_read_at_once_however_the_text_is_cut(seed):
    pieces, rest, cut = [], TWO_CALLS, random.Random(seed)
    while rest:
        size = cut.randint(1, 6)
        pieces.append(rest[:size])
        rest = rest[size:]
    reader = ToolCallReader()
    deltas = [delta for piece in pieces for delta in reader.feed(piece)[1]] + reader.finish()[1]

    whole = read_tool_calls(TWO_CALLS).sent_calls
    joined = {}
    for delta in deltas:
        entry = joined.setdefault(delta.index, {"names": [], "arguments": ""})
        if delta.name is not None:
            entry["names"].append(delta.name)
        entry["arguments"] += delta.arguments
    assert [(e["names"], e["arguments"]) for _, e in sorted(joined.items())] == [([c.name], c.arguments) for c in whole]
    assert [c.arguments for c in whole] == ['{"city": "Paris"}', "{}"]


def test_a_call_that_repeats_an_earlier_one_ends_the_answer_and_is_never_sent():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reader = ToolCallReader()
    deltas = [delta for character in call + "\n" + call + "\n" + call[:40] for delta in reader.feed(character)[1]]

    assert reader.repeated
    assert [c.arguments for c in reader.sent_calls] == ['{"city": "Paris"}']
    assert {delta.index for delta in deltas} == {0}


def test_text_that_does_not_start_a_call_is_content():
    reader = read_tool_calls("  <b>Paris</b> is sunny")

    assert reader.content == "<b>Paris</b> is sunny" and reader.sent_calls == []


# --- prompts -------------------------------------------------------------------------------------
def test_a_template_without_tools_gets_tools_calls_and_results_in_the_generic_format():
    messages = [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", (ChatToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
        ChatMessage("tool", "21 C", tool_call_id="call_2"),
    ]

    conversation = with_generic_tools(conversation_from_messages(messages, (WEATHER,)))

    assert '"name": "get_weather"' in conversation.system and "<tools>" in conversation.system
    assert [t.role for t in conversation.turns] == ["user", "assistant", "user"]
    assert conversation.turns[1].content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert conversation.turns[2].content == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n21 C\n</tool_response>"


def test_a_template_that_lays_tools_out_itself_gets_them_and_the_calls_as_objects():
    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}\n{% endfor %}"
    )
    message = ChatMessage("assistant", "", (ChatToolCall("call_1", "get_weather", '{"city": "Paris"}'),))

    text = render_chat_template(template, [message.template_message()], bos_token=None, eos_token=None, tools=[WEATHER.as_openai()])

    assert template_takes_tools(template) and not template_takes_tools("{{ messages }}")
    assert text == "TOOLS:get_weather;assistant:[get_weather Paris]"  # trim_blocks eats the newlines after tags


def test_the_tiny_models_prompt_lists_the_tools(tiny_model):
    settings = Settings(pretrained_model_name_or_path="tiny")
    client = create_app(settings, tiny_model).test_client()
    service = client.application.extensions["lm_service"].get()
    conversation = Conversation("Be brief.", (ChatMessage("user", "Weather?"),), (WEATHER,))

    prompt = service.prompt_builder.build(conversation, 4)

    assert "get_weather" in prompt.text and prompt.text.index("Be brief.") < prompt.text.index("<tools>")


# --- a stream that fails -------------------------------------------------------------------------
def test_a_stream_that_fails_after_it_began_ends_with_an_error_event(tiny_model):
    client = create_app(Settings(pretrained_model_name_or_path="tiny"), tiny_model).test_client()

    def failing(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    tiny_model.model.forward = failing
    try:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        )
        body = response.get_data(as_text=True)
    finally:
        del tiny_model.model.forward

    assert response.status_code == 200
    events = [event for event in body.split("\n\n") if event]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["type"] == "server_error" and "simulated device failure" in error["message"]
    assert "[DONE]" not in body
