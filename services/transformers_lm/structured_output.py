"""Structured answers: the grammars that constrain them (JSON, tool calls) and tool calls read back out of the text.

Grammars are llguidance's (Lark with embedded JSON schemas, `engines/grammar.py` says why that
library): the engine masks every token the grammar does not allow, so a JSON answer always parses
and validates and a tool call always names a tool and carries arguments valid against its
parameters' schema.

A tool call is written the way Hermes-style chat templates write it (Qwen2.5, SmolLM3, Hermes),
one block per call, blocks separated by a newline:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The grammar fixes everything but the arguments, so `ToolCallReader` can read calls while they are
generated: the arguments it streams are exactly the text between `"arguments": ` and the block's
closing `}`. A call that repeats an earlier call of the same answer word for word ends the answer
and is left out: it could only give the same result again, and a small model that may call tools
in parallel otherwise tends to repeat its call until it runs out of tokens. While a new call could
still become such a repeat (same name, arguments so far a prefix of the earlier call's), the
reader holds it back. Under `tool_choice: "auto"` the grammar allows either text that does not begin with
`<tool_call>` or calls: the model chooses with its first tokens, and a call, once begun, is
constrained like any other.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from common.lm_protocol import ResponseFormat

CALL_MARK = "<tool_call>"
CALL_OPEN = CALL_MARK + '\n{"name": "'
NAME_END = '", "arguments": '
CALL_CLOSE = "}\n</tool_call>"
CALL_SEPARATOR = "\n"
# How JSON is laid out in answers: fixed separators, no free whitespace (a small model that may add
# whitespace tends to add it forever).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Schema keys under which further schemas sit (for `strict_generation_schema`).
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolFunction:
    """A function the model may call: its name, what it does, and its parameters' JSON schema."""

    name: str
    description: str | None
    parameters: dict[str, Any] | None

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else NO_PARAMETERS
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """What the answer may be: `auto` (text or calls), `required` (calls), `named` (one call of `name`)."""

    tools: tuple[ToolFunction, ...]
    mode: Literal["auto", "required", "named"]
    name: str | None = None
    parallel: bool = True

    @property
    def callable_tools(self) -> tuple[ToolFunction, ...]:
        return tuple(tool for tool in self.tools if self.mode != "named" or tool.name == self.name)


def strict_generation_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` for generating, not validating: an object schema that lists `properties` and
    says nothing of others gets `additionalProperties: false`, so the model writes the properties the
    schema names instead of inventing more (what it writes still validates against the original).
    """
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if "properties" in node and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & node.keys():
            node["additionalProperties"] = False
        for key in _SUBSCHEMA_LISTS:
            children = node.get(key)
            if isinstance(children, list):
                for child in children:
                    walk(child)
        for key in _SUBSCHEMA_MAPS:
            children = node.get(key)
            if isinstance(children, dict):
                for child in children.values():
                    walk(child)
        for key in _SUBSCHEMA_VALUES:
            walk(node.get(key))

    walk(schema)
    return schema


def _json_rule(schema: dict[str, Any]) -> str:
    """An embedded JSON schema in llguidance's Lark (`%json {...}`), laid out as JSON_LAYOUT says."""
    laid_out = {**strict_generation_schema(schema), "x-guidance": JSON_LAYOUT}
    return "%json " + json.dumps(laid_out, ensure_ascii=False)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def response_format_schema(response_format: ResponseFormat) -> dict[str, Any]:
    """The JSON schema an answer in this format validates against (`json_object`: any object)."""
    if response_format.type == "json_schema" and response_format.json_schema is not None:
        return response_format.json_schema.schema_ or {}
    return {"type": "object"}


def not_starting_with(mark: str) -> str:
    """A regex for any text (after optional whitespace) that does not begin with `mark`."""
    alternatives = [""]
    for length in range(len(mark)):
        head = re.escape(mark[:length])
        if length:
            alternatives.append(head)
        excluded = re.escape(mark[length]) + ("\\s" if length == 0 else "")
        alternatives.append(f"{head}[^{excluded}](?s:.*)")
    return "\\s*(" + "|".join(alternatives) + ")"


def lark_grammar(response_format: ResponseFormat | None, tool_choice: ToolChoice | None) -> str | None:
    """The Lark grammar for an answer, or None when nothing constrains it."""
    text_rule = None
    if response_format is not None and response_format.constrains:
        text_rule = _json_rule(response_format_schema(response_format))
    if tool_choice is None:
        return None if text_rule is None else f"start: {text_rule}\n"
    lines = []
    call_rules = []
    for index, tool in enumerate(tool_choice.callable_tools):
        parameters = tool.parameters if tool.parameters is not None else NO_PARAMETERS
        head = _literal(CALL_OPEN + tool.name + NAME_END)
        lines.append(f"call_{index}: {head} {_json_rule(parameters)} {_literal(CALL_CLOSE)}")
        call_rules.append(f"call_{index}")
    lines.append("call: " + " | ".join(call_rules))
    if tool_choice.parallel and tool_choice.mode != "named":
        lines.append(f"calls: call ({_literal(CALL_SEPARATOR)} call)*")
    else:
        lines.append("calls: call")
    if tool_choice.mode == "auto":
        lines.append("start: text | calls")
        lines.append(f"text: {text_rule}" if text_rule else "text: TEXT")
        if not text_rule:
            pattern = not_starting_with(CALL_MARK).replace("/", "\\/")
            lines.append(f"TEXT: /{pattern}/")
    else:
        lines.append("start: calls")
    return "\n".join(lines) + "\n"


def grammar_source(response_format: ResponseFormat | None, tool_choice: ToolChoice | None) -> str | None:
    """llguidance's grammar for an answer (what `GrammarTokenizer.compile` takes), or None."""
    lark = lark_grammar(response_format, tool_choice)
    if lark is None:
        return None
    from services.transformers_lm.engines.grammar import llguidance_module

    return llguidance_module().LLMatcher.grammar_from_lark(lark)


# --- the generic tool format of prompts (templates that do not take `tools` themselves) ----------
def tools_instructions(tools: tuple[ToolFunction, ...]) -> str:
    """What a prompt says about the tools, for chat templates without a tool format of their own."""
    listed = "\n".join(json.dumps(tool.as_openai(), ensure_ascii=False) for tool in tools)
    return (
        "You can call functions to answer. They are listed below, one JSON object per line, between "
        "<tools> and </tools>:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, answer with a JSON object that names it and gives its arguments, between "
        "<tool_call> and </tool_call>, like this:\n"
        f'{CALL_OPEN}<function name>{NAME_END}{{<arguments as JSON>}}{CALL_CLOSE}'
    )


def call_block(name: str, arguments: str) -> str:
    """A call as the model writes it (for an assistant turn of the history)."""
    return f"{CALL_OPEN}{name}{NAME_END}{arguments}{CALL_CLOSE}"


def tool_response_block(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


# --- reading calls back --------------------------------------------------------------------------
def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ReadCall:
    """A tool call read from the answer so far: its arguments may still grow until `complete`."""

    id: str
    name: str
    arguments: str = ""  # sent (or, for a held-back call, read) so far
    complete: bool = False
    held: bool = False  # may still turn out to repeat an earlier call: nothing of it sent yet


@dataclass(frozen=True)
class CallDelta:
    """What a stream sends for one call: the id and name once (first delta), then argument text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ToolCallReader:
    """Reads an answer that may be tool calls, as text arrives (`feed`), and at its end (`finish`).

    `feed` returns the content text and the call deltas that are safe to send now; text that may
    still become the start of a call, or the start of a call's closing, is held back. Whatever is
    streamed concatenates to what `finish` then holds (`content`, `calls`).
    """

    text: str = ""
    mode: Literal["pending", "text", "calls"] = "pending"
    calls: list[ReadCall] = field(default_factory=list)
    repeated: bool = False  # a call repeated an earlier one: the answer is over
    _content_sent: int = 0

    def feed(self, piece: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        if self.repeated:
            return "", []
        self.text += piece
        stripped = self.text.lstrip()
        if self.mode == "pending":
            if stripped.startswith(CALL_MARK):
                self.mode = "calls"
            elif (stripped and not CALL_MARK.startswith(stripped)) or final:
                self.mode = "text"
            else:
                return "", []
        if self.mode == "text":
            content = stripped[self._content_sent :]
            self._content_sent = len(stripped)
            return content, []
        return "", self._read_calls(stripped, final)

    def finish(self) -> tuple[str, list[CallDelta]]:
        return self.feed("", final=True)

    @property
    def sent_calls(self) -> list[ReadCall]:
        """The calls sent so far (a call still held back is not among them)."""
        return [call for call in self.calls if not call.held]

    @property
    def content(self) -> str | None:
        return self.text.lstrip() if self.mode == "text" else None

    def _read_calls(self, text: str, final: bool) -> list[CallDelta]:
        deltas: list[CallDelta] = []
        position = 0
        index = 0
        while not self.repeated and text.startswith(CALL_OPEN, position):
            name_start = position + len(CALL_OPEN)
            name_end = text.find(NAME_END, name_start)
            if name_end < 0:
                break
            if index == len(self.calls):
                name = text[name_start:name_end]
                self.calls.append(ReadCall(new_call_id(), name, held=any(c.name == name for c in self.calls)))
                if not self.calls[index].held:
                    deltas.append(CallDelta(index, "", self.calls[index].id, name))
            call = self.calls[index]
            arguments_start = name_end + len(NAME_END)
            end = text.find(CALL_CLOSE, arguments_start)
            arguments = text[arguments_start:] if end < 0 else text[arguments_start:end]
            if end < 0 and not final:
                arguments = arguments[: len(arguments) - _held_back(arguments, CALL_CLOSE)]
            if call.held:
                deltas.extend(self._settle_held(index, arguments, complete=end >= 0, final=final))
            elif len(arguments) > len(call.arguments):
                deltas.append(CallDelta(index, arguments[len(call.arguments) :]))
                call.arguments = arguments
            if end < 0 or self.repeated:
                break
            call.complete = True
            position = end + len(CALL_CLOSE)
            if text.startswith(CALL_SEPARATOR, position):
                position += len(CALL_SEPARATOR)
            index += 1
        return deltas

    def _settle_held(self, index: int, arguments: str, complete: bool, final: bool) -> list[CallDelta]:
        """A held-back call: drop it as a repeat, keep holding it, or send it all once it differs."""
        call = self.calls[index]
        call.arguments = arguments
        earlier = [c.arguments for c in self.calls[:index] if c.name == call.name and c.complete]
        if complete and arguments in earlier:
            self.calls.pop(index)
            self.repeated = True
            return []
        if not complete and not final and any(previous.startswith(arguments) for previous in earlier):
            return []
        call.held = False
        return [CallDelta(index, "", call.id, call.name), CallDelta(index, arguments)] if arguments else [
            CallDelta(index, "", call.id, call.name)
        ]


def _held_back(text: str, closing: str) -> int:
    """How many characters at the end of `text` might be the beginning of `closing`."""
    for length in range(min(len(closing), len(text)), 0, -1):
        if text.endswith(closing[:length]):
            return length
    return 0


def read_tool_calls(text: str) -> ToolCallReader:
    """A whole answer read at once (what a non-streamed completion does)."""
    reader = ToolCallReader()
    reader.feed(text, final=True)
    return reader


def iterate_calls(reader: ToolCallReader) -> Iterator[dict[str, Any]]:
    """The calls as OpenAI's `message.tool_calls`."""
    for call in reader.sent_calls:
        yield {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
