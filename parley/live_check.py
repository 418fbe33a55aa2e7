"""`parley check --live URL`: OpenAI's contract, checked case by case against any OpenAI-compatible server.

Plain HTTP (`requests`), so the check sees the wire itself — every field, every server-sent event —
and needs no client library. Each case sends one or a few requests, greedy (temperature 0), and
either passes with a short note or fails saying why; `run_live_check` runs them all and never
stops at a failure. The cases are what OpenAI-compatible servers are known to get wrong: streamed
tool calls whose arguments do not add up, `tool_choice` in its object form, `parallel_tool_calls`,
structured output that does not parse, error bodies in other shapes.

Usage counts are compared with the server's own tokenizer where it offers one (`POST /tokenize` at
the server's root, as llama-server, vLLM and Parley's LLM service do); a server without one is
still checked for `completion_tokens == max_tokens` on an answer cut for length.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import requests

GREEDY = {"temperature": 0, "seed": 7}
QUESTION = "What is the capital of France?"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The current time, without parameters"}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_QUESTION = [{"role": "user", "content": "Invent a person. Answer in JSON with their name and age."}]
TOOL_TOKENS = 64
SHORT_TOKENS = 24


class CaseFailed(AssertionError):
    """The server broke the contract; the message says how."""


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    why: str
    seconds: float

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:32} {self.seconds:6.1f}s  {self.why}"


class LiveServer:
    """An OpenAI-compatible base URL (`.../v1`) and how to call it."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._model = model

    @property
    def root_url(self) -> str:
        """The server's root: the base URL without its `/v1`."""
        return self.base_url.removesuffix("/v1")

    @property
    def model(self) -> str:
        if self._model is None:
            data = self.get("/models").json().get("data") or []
            if not data:
                raise CaseFailed("GET /models lists no model; name one with --model")
            self._model = data[0]["id"]
        return self._model

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base_url + path, timeout=self.timeout)

    def post(self, path: str, body: dict, *, stream: bool = False) -> requests.Response:
        return self.session.post(self.base_url + path, json=body, timeout=self.timeout, stream=stream)

    def chat(self, messages: list[dict], **parameters) -> dict:
        response = self.post("/chat/completions", {"model": self.model, "messages": messages, **GREEDY, **parameters})
        return _ok(response, "POST /chat/completions")

    def completion(self, prompt: str, **parameters) -> dict:
        response = self.post("/completions", {"model": self.model, "prompt": prompt, **GREEDY, **parameters})
        return _ok(response, "POST /completions")

    def stream(self, path: str, body: dict) -> list[dict | str]:
        """A streamed request's events in order: each `data:` as JSON, `[DONE]` as the string, an
        `event: error` as {"event": "error", ...}."""
        response = self.post(path, {"model": self.model, **GREEDY, **body, "stream": True}, stream=True)
        if response.status_code != 200:
            raise CaseFailed(f"POST {path} (stream) answered {response.status_code}: {response.text[:200]}")
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise CaseFailed(f"a stream's Content-Type is {response.headers.get('Content-Type')!r}, not text/event-stream")
        return list(_events(response))

    def tokenize(self, text: str) -> int | None:
        """The server's own token count of `text` as a prompt, when it has a tokenizer endpoint."""
        try:
            response = self.session.post(
                self.root_url + "/tokenize",
                json={"content": text, "prompt": text, "model": self.model, "add_special": True},
                timeout=self.timeout,
            )
        except requests.RequestException:
            return None
        if response.status_code != 200:
            return None
        body = response.json()
        tokens = body.get("tokens")
        return len(tokens) if isinstance(tokens, list) else body.get("count")


def _ok(response: requests.Response, what: str) -> dict:
    if response.status_code != 200:
        raise CaseFailed(f"{what} answered {response.status_code}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError:
        raise CaseFailed(f"{what} answered 200 with a body that is not JSON: {response.text[:200]}") from None


def _events(response: requests.Response) -> Iterator[dict | str]:
    event_name = None
    for raw in response.iter_lines(decode_unicode=True):
        if not raw:
            event_name = None
            continue
        if raw.startswith("event:"):
            event_name = raw[6:].strip()
            continue
        if not raw.startswith("data:"):
            continue
        data = raw[5:].strip()
        if data == "[DONE]":
            yield "[DONE]"
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            raise CaseFailed(f"a server-sent event is not JSON: {data[:200]}") from None
        yield {"event": event_name, **payload} if event_name == "error" else payload


def check(condition: bool, why: str) -> None:
    if not condition:
        raise CaseFailed(why)


def _validate(instance: Any, schema: dict, what: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError as error:
        raise CaseFailed(f"{what} does not validate against its schema: {error.message}") from None


def _json(text: Any, what: str) -> Any:
    check(isinstance(text, str), f"{what} is {type(text).__name__}, not a JSON string")
    try:
        return json.loads(text)
    except ValueError:
        raise CaseFailed(f"{what} is not JSON: {text[:200]!r}") from None


def _choice(answer: dict) -> dict:
    choices = answer.get("choices")
    check(isinstance(choices, list) and len(choices) == 1, f"expected one choice, got {choices!r}"[:300])
    return choices[0]


def _usage_adds_up(usage: Any) -> dict:
    check(isinstance(usage, dict), f"usage is {usage!r}")
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        check(isinstance(usage.get(key), int), f"usage.{key} is {usage.get(key)!r}, not an integer")
    check(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], f"usage does not add up: {usage}")
    return usage


def _error_shape(response: requests.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    """The response is `status` with OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    check(response.status_code == status, f"answered {response.status_code}, not {status}: {response.text[:200]}")
    try:
        body = response.json()
    except ValueError:
        raise CaseFailed(f"the error body is not JSON: {response.text[:200]}") from None
    error = body.get("error") if isinstance(body, dict) else None
    check(isinstance(error, dict), f"the body has no error object: {body!r}"[:300])
    missing = [key for key in ("message", "type", "param", "code") if key not in error]
    check(not missing, f"the error lacks {', '.join(missing)}: {error}")
    check(isinstance(error["message"], str) and error["message"], f"the error has no message: {error}")
    if param is not None:
        check(error["param"] == param, f"error.param is {error['param']!r}, not {param!r}")
    if code is not None:
        check(error["code"] == code, f"error.code is {error['code']!r}, not {code!r}")
    return f"{status} {error['type']}" + (f", code {error['code']}" if error["code"] else "")


def _chunks(events: list[dict | str]) -> list[dict]:
    check(bool(events) and events[-1] == "[DONE]", f"the stream does not end with [DONE] (last: {events[-1:]!r})"[:300])
    errors = [event for event in events if isinstance(event, dict) and "error" in event]
    check(not errors, f"the stream reported an error: {errors[0]}"[:300] if errors else "")
    return [event for event in events if isinstance(event, dict)]


def _tool_calls(message: dict, tools: list[dict]) -> list[dict]:
    """Checks a message that called tools, as OpenAI shapes it; the calls."""
    calls = message.get("tool_calls")
    check(isinstance(calls, list) and calls, f"no tool_calls in the message: {message}"[:300])
    check(message.get("content") is None, f"content is {message.get('content')!r} beside tool_calls, not null")
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") for tool in tools}
    ids = set()
    for index, call in enumerate(calls):
        where = f"tool_calls[{index}]"
        check(isinstance(call.get("id"), str) and call["id"], f"{where} has no id")
        check(call["id"] not in ids, f"{where} repeats the id {call['id']}")
        ids.add(call["id"])
        check(call.get("type") == "function", f"{where}.type is {call.get('type')!r}")
        function = call.get("function") or {}
        check(function.get("name") in schemas, f"{where} calls {function.get('name')!r}, not one of the tools")
        arguments = _json(function.get("arguments"), f"{where}.function.arguments")
        schema = schemas[function["name"]]
        if schema is None:
            check(function["arguments"] == "{}", f"{where} calls a tool without parameters with {function['arguments']!r}, not '{{}}'")
        else:
            _validate(arguments, schema, f"{where}.function.arguments")
    return calls


# --- the cases ----------------------------------------------------------------------------------
def models(server: LiveServer) -> str:
    body = _ok(server.get("/models"), "GET /models")
    check(body.get("object") == "list", f"object is {body.get('object')!r}, not 'list'")
    ids = [entry.get("id") for entry in body.get("data") or []]
    check(server.model in ids, f"{server.model!r} is not among the models {ids}")
    return f"{len(ids)} model(s), {server.model!r} among them"


def chat(server: LiveServer) -> str:
    answer = server.chat([{"role": "user", "content": QUESTION}], max_tokens=SHORT_TOKENS)
    check(answer.get("object") == "chat.completion", f"object is {answer.get('object')!r}")
    choice = _choice(answer)
    message = choice.get("message") or {}
    check(message.get("role") == "assistant", f"role is {message.get('role')!r}")
    check(isinstance(message.get("content"), str) and message["content"], f"content is {message.get('content')!r}")
    check(choice.get("finish_reason") in ("stop", "length"), f"finish_reason is {choice.get('finish_reason')!r}")
    _usage_adds_up(answer.get("usage"))
    return f"{message['content'][:40]!r}"


def completions(server: LiveServer) -> str:
    answer = server.completion("The capital of France is", max_tokens=8)
    check(answer.get("object") == "text_completion", f"object is {answer.get('object')!r}")
    choice = _choice(answer)
    check(isinstance(choice.get("text"), str), f"text is {choice.get('text')!r}")
    check(choice.get("finish_reason") in ("stop", "length"), f"finish_reason is {choice.get('finish_reason')!r}")
    _usage_adds_up(answer.get("usage"))
    return f"{choice['text'][:40]!r}"


def usage_counts(server: LiveServer) -> str:
    prompt = "Count with me: one, two, three,"
    answer = server.completion(prompt, max_tokens=5)
    usage = _usage_adds_up(answer.get("usage"))
    choice = _choice(answer)
    if choice.get("finish_reason") == "length":
        check(usage["completion_tokens"] == 5, f"cut for length at max_tokens 5 but completion_tokens is {usage['completion_tokens']}")
    counted = server.tokenize(prompt)
    if counted is None:
        return "completion_tokens == max_tokens; no /tokenize to count the prompt with"
    check(usage["prompt_tokens"] == counted, f"prompt_tokens is {usage['prompt_tokens']}, the server's tokenizer counts {counted}")
    return f"prompt_tokens {counted} as /tokenize counts, completion_tokens == max_tokens"


def finish_reason_length(server: LiveServer) -> str:
    answer = server.chat([{"role": "user", "content": QUESTION}], max_tokens=1)
    choice = _choice(answer)
    check(choice.get("finish_reason") == "length", f"finish_reason is {choice.get('finish_reason')!r} at max_tokens 1")
    check(answer["usage"]["completion_tokens"] == 1, f"completion_tokens is {answer['usage']['completion_tokens']} at max_tokens 1")
    return "length, 1 completion token"


def chat_stream(server: LiveServer) -> str:
    messages = [{"role": "user", "content": QUESTION}]
    whole = _choice(server.chat(messages, max_tokens=SHORT_TOKENS))
    chunks = _chunks(server.stream("/chat/completions", {"messages": messages, "max_tokens": SHORT_TOKENS}))
    check(all(chunk.get("object") == "chat.completion.chunk" for chunk in chunks), "a chunk's object is not chat.completion.chunk")
    deltas = [choice for chunk in chunks for choice in chunk.get("choices") or []]
    roles = [d["delta"]["role"] for d in deltas if "role" in (d.get("delta") or {})]
    check(roles == ["assistant"], f"the role was sent {len(roles)} times: {roles}")
    finishes = [d["finish_reason"] for d in deltas if d.get("finish_reason")]
    check(len(finishes) == 1, f"{len(finishes)} chunks carry a finish_reason: {finishes}")
    check(finishes[0] == whole["finish_reason"], f"streamed finish_reason {finishes[0]!r}, non-streamed {whole['finish_reason']!r}")
    text = "".join((d.get("delta") or {}).get("content") or "" for d in deltas)
    check(text == whole["message"]["content"], f"the streamed text {text[:60]!r} is not the non-streamed {whole['message']['content'][:60]!r}")
    return f"{len(chunks)} chunks join to the non-streamed answer"


def completions_stream(server: LiveServer) -> str:
    whole = _choice(server.completion("The capital of France is", max_tokens=8))
    chunks = _chunks(server.stream("/completions", {"prompt": "The capital of France is", "max_tokens": 8}))
    text = "".join(choice.get("text") or "" for chunk in chunks for choice in chunk.get("choices") or [])
    check(text == whole["text"], f"the streamed text {text!r} is not the non-streamed {whole['text']!r}")
    return f"{len(chunks)} chunks join to the non-streamed text"


def include_usage(server: LiveServer) -> str:
    messages = [{"role": "user", "content": QUESTION}]
    whole = server.chat(messages, max_tokens=8)
    chunks = _chunks(
        server.stream("/chat/completions", {"messages": messages, "max_tokens": 8, "stream_options": {"include_usage": True}})
    )
    last = chunks[-1]
    check(last.get("choices") == [], f"the last chunk has choices {last.get('choices')!r}, not []")
    usage = _usage_adds_up(last.get("usage"))
    check(usage == whole["usage"], f"the stream's usage {usage} differs from the non-streamed {whole['usage']}")
    check(all(chunk.get("usage") is None for chunk in chunks[:-1]), "a chunk before the last carries usage")
    return f"a final usage chunk equal to the non-streamed usage ({usage['total_tokens']} tokens)"


def json_object(server: LiveServer) -> str:
    answer = server.chat(PERSON_QUESTION, max_tokens=TOOL_TOKENS, response_format={"type": "json_object"})
    choice = _choice(answer)
    check(choice.get("finish_reason") == "stop", f"finish_reason is {choice.get('finish_reason')!r}")
    value = _json(choice["message"]["content"], "content")
    check(isinstance(value, dict), f"content is JSON but not an object: {value!r}"[:200])
    return f"{choice['message']['content'][:60]}"


def _person_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}


def json_schema(server: LiveServer) -> str:
    answer = server.chat(PERSON_QUESTION, max_tokens=TOOL_TOKENS, response_format=_person_format())
    choice = _choice(answer)
    check(choice.get("finish_reason") == "stop", f"finish_reason is {choice.get('finish_reason')!r}")
    _validate(_json(choice["message"]["content"], "content"), PERSON_SCHEMA, "content")
    return f"{choice['message']['content'][:60]}"


def json_schema_stream(server: LiveServer) -> str:
    whole = _choice(server.chat(PERSON_QUESTION, max_tokens=TOOL_TOKENS, response_format=_person_format()))
    chunks = _chunks(
        server.stream(
            "/chat/completions", {"messages": PERSON_QUESTION, "max_tokens": TOOL_TOKENS, "response_format": _person_format()}
        )
    )
    text = "".join((c.get("delta") or {}).get("content") or "" for chunk in chunks for c in chunk.get("choices") or [])
    _validate(_json(text, "the streamed content"), PERSON_SCHEMA, "the streamed content")
    check(text == whole["message"]["content"], f"the streamed {text!r} is not the non-streamed {whole['message']['content']!r}")
    return "the streamed JSON validates and equals the non-streamed"


def json_schema_completions(server: LiveServer) -> str:
    answer = server.completion(
        "A person, as JSON with name and age:\n", max_tokens=TOOL_TOKENS, response_format=_person_format()
    )
    choice = _choice(answer)
    _validate(_json(choice.get("text"), "text"), PERSON_SCHEMA, "text")
    return f"{choice['text'][:60]}"


def tool_choice_required(server: LiveServer) -> str:
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    answer = server.chat(WEATHER_QUESTION, max_tokens=TOOL_TOKENS, tools=tools, tool_choice="required")
    choice = _choice(answer)
    calls = _tool_calls(choice.get("message") or {}, tools)
    check(choice.get("finish_reason") == "tool_calls", f"finish_reason is {choice.get('finish_reason')!r}, not tool_calls")
    return ", ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)[:80]


def tool_choice_named(server: LiveServer) -> str:
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    choice_object = {"type": "function", "function": {"name": "get_weather"}}
    answer = server.chat(WEATHER_QUESTION, max_tokens=TOOL_TOKENS, tools=tools, tool_choice=choice_object)
    choice = _choice(answer)
    calls = _tool_calls(choice.get("message") or {}, tools)
    check([c["function"]["name"] for c in calls] == ["get_weather"], f"called {[c['function']['name'] for c in calls]}, not get_weather once")
    check(choice.get("finish_reason") in ("tool_calls", "stop"), f"finish_reason is {choice.get('finish_reason')!r}")
    return f"get_weather({calls[0]['function']['arguments']})"


def tool_without_parameters(server: LiveServer) -> str:
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    answer = server.chat(
        [{"role": "user", "content": "What time is it?"}], max_tokens=TOOL_TOKENS, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = _tool_calls(_choice(answer).get("message") or {}, tools)
    check(calls[0]["function"]["arguments"] == "{}", f"arguments are {calls[0]['function']['arguments']!r}, not '{{}}'")
    return "get_time({})"


def tool_choice_auto(server: LiveServer) -> str:
    tools = [WEATHER_TOOL]
    answer = server.chat(WEATHER_QUESTION, max_tokens=TOOL_TOKENS, tools=tools, tool_choice="auto")
    choice = _choice(answer)
    message = choice.get("message") or {}
    if message.get("tool_calls"):
        _tool_calls(message, tools)
        check(choice.get("finish_reason") == "tool_calls", f"finish_reason is {choice.get('finish_reason')!r} after calls")
        return "the model called a tool"
    check(isinstance(message.get("content"), str), f"neither content nor tool_calls: {message}"[:300])
    check(choice.get("finish_reason") in ("stop", "length"), f"finish_reason is {choice.get('finish_reason')!r} for text")
    return "the model answered in text"


def tool_choice_none(server: LiveServer) -> str:
    answer = server.chat(WEATHER_QUESTION, max_tokens=SHORT_TOKENS, tools=[WEATHER_TOOL], tool_choice="none")
    message = _choice(answer).get("message") or {}
    check(not message.get("tool_calls"), f"tool_calls under tool_choice none: {message.get('tool_calls')}")
    check(isinstance(message.get("content"), str), f"content is {message.get('content')!r}")
    return "text, no tool_calls"


def tool_calls_stream(server: LiveServer) -> str:
    tools = [WEATHER_TOOL, CLOCK_TOOL]
    body = {"messages": WEATHER_QUESTION, "max_tokens": TOOL_TOKENS, "tools": tools, "tool_choice": "required"}
    whole = _choice(server.chat(WEATHER_QUESTION, max_tokens=TOOL_TOKENS, tools=tools, tool_choice="required"))
    expected = _tool_calls(whole.get("message") or {}, tools)
    chunks = _chunks(server.stream("/chat/completions", body))
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
            for delta in (choice.get("delta") or {}).get("tool_calls") or []:
                check(isinstance(delta.get("index"), int), f"a tool call delta has no index: {delta}")
                call = calls.setdefault(delta["index"], {"ids": [], "names": [], "arguments": ""})
                if delta.get("id"):
                    call["ids"].append(delta["id"])
                function = delta.get("function") or {}
                if function.get("name"):
                    call["names"].append(function["name"])
                call["arguments"] += function.get("arguments") or ""
    check(finishes == ["tool_calls"], f"finish chunks: {finishes}, not one tool_calls")
    check(sorted(calls) == list(range(len(expected))), f"streamed call indexes {sorted(calls)}, non-streamed {len(expected)} calls")
    for index, call in calls.items():
        check(len(call["ids"]) == 1 and len(call["names"]) == 1, f"call {index}: id sent {len(call['ids'])}, name {len(call['names'])} times")
        want = expected[index]["function"]
        check(call["names"][0] == want["name"], f"call {index} streamed {call['names'][0]!r}, non-streamed {want['name']!r}")
        check(call["arguments"] == want["arguments"], f"call {index} streamed arguments {call['arguments']!r}, non-streamed {want['arguments']!r}")
    return f"{len(calls)} call(s); fragments join to the non-streamed arguments"


def tool_results_in_history(server: LiveServer) -> str:
    messages = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "sunny"}'},
    ]
    answer = server.chat(messages, max_tokens=SHORT_TOKENS, tools=[WEATHER_TOOL])
    message = _choice(answer).get("message") or {}
    check(isinstance(message.get("content"), str) or message.get("tool_calls"), f"no answer: {message}"[:300])
    return "accepted: an assistant's tool_calls and a tool message"


def tool_choice_without_tools(server: LiveServer) -> str:
    response = server.post("/chat/completions", {"model": server.model, "messages": WEATHER_QUESTION, "tool_choice": "required"})
    return _error_shape(response, 400, param="tool_choice")


def unknown_model(server: LiveServer) -> str:
    response = server.post("/chat/completions", {"model": "no-such-model-xyz", "messages": WEATHER_QUESTION, "max_tokens": 1})
    return _error_shape(response, 404, code="model_not_found")


def context_length_exceeded(server: LiveServer) -> str:
    huge = "hello " * 60000  # tens of thousands of tokens: past a small model's window
    response = server.post("/chat/completions", {"model": server.model, "messages": [{"role": "user", "content": huge}], "max_tokens": 8})
    return _error_shape(response, 400, param="messages", code="context_length_exceeded")


def bad_parameter(server: LiveServer) -> str:
    response = server.post("/chat/completions", {"model": server.model, "messages": WEATHER_QUESTION, "temperature": 7})
    return _error_shape(response, 400, param="temperature")


def bad_request_while_streaming(server: LiveServer) -> str:
    body = {"model": server.model, "messages": WEATHER_QUESTION, "temperature": 7, "stream": True}
    return _error_shape(server.post("/chat/completions", body), 400) + " before the stream starts"


CASES: list[tuple[str, Callable[[LiveServer], str]]] = [
    ("models", models),
    ("chat", chat),
    ("completions", completions),
    ("usage counts", usage_counts),
    ("finish_reason length", finish_reason_length),
    ("chat stream", chat_stream),
    ("completions stream", completions_stream),
    ("stream include_usage", include_usage),
    ("response_format json_object", json_object),
    ("response_format json_schema", json_schema),
    ("json_schema streamed", json_schema_stream),
    ("json_schema on /completions", json_schema_completions),
    ("tool_choice required", tool_choice_required),
    ("tool_choice named (object form)", tool_choice_named),
    ("tool without parameters", tool_without_parameters),
    ("tool_choice auto", tool_choice_auto),
    ("tool_choice none", tool_choice_none),
    ("tool calls streamed", tool_calls_stream),
    ("tool results in the history", tool_results_in_history),
    ("tool_choice without tools: 400", tool_choice_without_tools),
    ("unknown model: 404", unknown_model),
    ("context overflow: 400", context_length_exceeded),
    ("bad parameter: 400", bad_parameter),
    ("bad parameter, stream: 400", bad_request_while_streaming),
]


def run_live_check(
    base_url: str,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = 300.0,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Every case against `base_url` (`http://host:port/v1`), in order; `on_result` hears each as it ends."""
    server = LiveServer(base_url, model, api_key, timeout)
    results = []
    for name, case in CASES:
        started = time.monotonic()
        try:
            result = CaseResult(name, True, case(server), time.monotonic() - started)
        except CaseFailed as failure:
            result = CaseResult(name, False, str(failure), time.monotonic() - started)
        except (requests.RequestException, ValueError, KeyError, TypeError) as error:
            result = CaseResult(name, False, f"{type(error).__name__}: {error}"[:300], time.monotonic() - started)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
