"""OpenAI's contract on the real embedded SmolLM2, on both backends, through the official `openai` client.

Structured output and tool calls are constrained decoding's job: a 135M model answers with JSON
that validates and with calls whose arguments fit the tool's schema only because every other token
is masked, so each test checks the answer against its schema with `jsonschema`, never a fixed
text. One server per backend for the whole module (the model loads once on each); greedy requests
with small `max_tokens` keep it quick. `parley check --live` runs its whole case list against the
same servers and must exit 0.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field
from support.servers import REPO_ROOT, service_server

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
GREEDY = {"temperature": 0, "seed": 7}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_PARAMETERS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
}
ASK_PERSON = [{"role": "user", "content": "Invent a person. Answer in JSON with their name and age."}]


@pytest.fixture(scope="module", params=["transformers", "llama_cpp"])
def lm_url(request):
    if request.param == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make install installs it)")
    env = {"BACKEND": request.param, "PRETRAINED_MODEL_NAME_OR_PATH": MODEL, "GUNICORN_THREADS": "8", "MAX_BATCH_SIZE": "8"}
    with service_server("transformers_lm", env, startup_timeout_seconds=400) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def client(lm_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=lm_url + "/v1", api_key="not-needed", max_retries=0, timeout=600)


def chat(client, messages, **parameters):
    return client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, **parameters)


def person_format(schema: dict = PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def assert_valid_calls(message, tools: list[dict]) -> list:
    """OpenAI's shape of a message that called tools, every call's arguments valid against its tool's schema."""
    assert message.content is None
    assert message.tool_calls, message
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") for tool in tools}
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in schemas
        arguments = json.loads(call.function.arguments)
        if schemas[call.function.name] is None:
            assert call.function.arguments == "{}"
        else:
            jsonschema.validate(arguments, schemas[call.function.name])
    return message.tool_calls


# --- structured output ---------------------------------------------------------------------------
def test_json_object_answers_with_a_json_object(client):
    answer = chat(client, ASK_PERSON, max_tokens=48, response_format={"type": "json_object"})

    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_json_schema_answers_validate_against_the_schema(client):
    answer = chat(client, ASK_PERSON, max_tokens=48, response_format=person_format())

    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)


def test_parse_with_a_pydantic_model_gives_that_model(client):
    answer = client.chat.completions.parse(model=MODEL, messages=ASK_PERSON, response_format=Person, max_tokens=48, **GREEDY)

    assert isinstance(answer.choices[0].message.parsed, Person)


def test_a_text_completion_follows_the_schema_too(client):
    answer = client.completions.create(
        model=MODEL, prompt="A person as JSON:\n", max_tokens=48, extra_body={"response_format": person_format()}, **GREEDY
    )

    jsonschema.validate(json.loads(answer.choices[0].text), PERSON)


def test_streamed_json_joins_to_the_non_streamed_answer(client):
    whole = chat(client, ASK_PERSON, max_tokens=48, response_format=person_format())
    chunks = list(chat(client, ASK_PERSON, max_tokens=48, response_format=person_format(), stream=True))

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_a_schema_the_library_cannot_compile_is_a_400_naming_the_keyword(client):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}, "then": {}}

    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, ASK_PERSON, max_tokens=8, response_format=person_format(schema))

    error = raised.value.body
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    assert '"if"' in error["message"]


def test_a_dream_config_may_ask_for_a_json_answer(lm_url):
    config = {"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 48, "response_format": person_format()}
    response = requests.post(lm_url + "/respond", json={"dialog_contexts": [["Invent a person."]], "configs": [config]}, timeout=600)

    assert response.status_code == 200, response.text
    [[hypothesis]] = response.json()
    jsonschema.validate(json.loads(hypothesis), PERSON)


# --- tool calls ----------------------------------------------------------------------------------
def test_tool_choice_required_calls_a_tool_with_arguments_valid_against_its_schema(client):
    answer = chat(client, ASK_WEATHER, max_tokens=64, tools=[WEATHER, CLOCK], tool_choice="required")

    assert answer.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(answer.choices[0].message, [WEATHER, CLOCK])


def test_a_named_tool_choice_calls_exactly_that_tool(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = chat(client, ASK_WEATHER, max_tokens=64, tools=[CLOCK, WEATHER], tool_choice=named)

    calls = assert_valid_calls(answer.choices[0].message, [CLOCK, WEATHER])
    assert [call.function.name for call in calls] == ["get_weather"]


def test_a_tool_without_parameters_is_called_with_empty_arguments(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    answer = chat(client, [{"role": "user", "content": "What time is it?"}], max_tokens=32, tools=[CLOCK, WEATHER], tool_choice=named)

    [call] = assert_valid_calls(answer.choices[0].message, [CLOCK, WEATHER])
    assert call.function.arguments == "{}"


def test_tool_choice_auto_gives_either_text_or_valid_calls(client):
    answer = chat(client, ASK_WEATHER, max_tokens=32, tools=[WEATHER])

    choice = answer.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message, [WEATHER])
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_tool_choice_none_answers_in_text(client):
    answer = chat(client, ASK_WEATHER, max_tokens=16, tools=[WEATHER], tool_choice="none")

    assert not answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content


def test_streamed_tool_calls_reassemble_to_the_non_streamed_calls(client):
    parameters = {"max_tokens": 64, "tools": [WEATHER, CLOCK], "tool_choice": "required"}
    whole = chat(client, ASK_WEATHER, **parameters)
    chunks = list(chat(client, ASK_WEATHER, stream=True, **parameters))

    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert roles == ["assistant"] and finishes == ["tool_calls"]
    streamed: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = streamed.setdefault(delta.index, {"ids": [], "names": [], "arguments": ""})
            if delta.id:
                call["ids"].append(delta.id)
            if delta.function and delta.function.name:
                call["names"].append(delta.function.name)
            call["arguments"] += (delta.function.arguments if delta.function else None) or ""
    expected = whole.choices[0].message.tool_calls
    assert sorted(streamed) == list(range(len(expected)))
    for index, call in streamed.items():
        assert len(call["ids"]) == 1 and call["names"] == [expected[index].function.name]
        assert call["arguments"] == expected[index].function.arguments


def test_a_history_with_calls_and_tool_results_is_answered(client):
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    answer = chat(client, messages, max_tokens=24, tools=[WEATHER], tool_choice="none")

    assert answer.choices[0].message.content


def test_tool_choice_without_tools_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, ASK_WEATHER, max_tokens=8, tool_choice="required")

    assert raised.value.body["param"] == "tool_choice"


def test_a_tool_message_without_its_call_id_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, [*ASK_WEATHER, {"role": "tool", "content": "sunny"}], max_tokens=8)

    assert raised.value.body["param"] == "messages[1].tool_call_id"


# --- streaming, usage, errors --------------------------------------------------------------------
def test_include_usage_ends_the_stream_with_the_usage_of_the_non_streamed_answer(client):
    whole = chat(client, ASK_WEATHER, max_tokens=8)
    chunks = list(chat(client, ASK_WEATHER, max_tokens=8, stream=True, stream_options={"include_usage": True}))

    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_prompt_tokens_equal_the_tokenizers_count(client, lm_url):
    answer = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, **GREEDY)
    counted = requests.post(lm_url + "/tokenize", json={"content": "The capital of France is"}, timeout=60).json()

    assert answer.usage.prompt_tokens == counted["count"] == len(counted["tokens"])
    assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"


def test_a_context_overflow_is_a_400_context_length_exceeded_on_messages(client):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, [{"role": "user", "content": "hello " * 20000}], max_tokens=8)

    assert raised.value.body["code"] == "context_length_exceeded"
    assert raised.value.body["param"] == "messages"


def test_an_unknown_model_is_a_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=ASK_WEATHER, max_tokens=1)

    assert raised.value.body["code"] == "model_not_found"


# --- the live check --------------------------------------------------------------------------------
def test_parley_check_live_passes_every_case(lm_url):
    result = subprocess.run(
        [sys.executable, "-m", "parley", "check", "--live", lm_url + "/v1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 20 and all(line.startswith("PASS") for line in lines), result.stdout
