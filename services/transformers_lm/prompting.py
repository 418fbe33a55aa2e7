"""From a dialog to prompt token ids, and from generated text back to a clean hypothesis.

Three prompt styles, chosen once per model: a `prompt_format` from the settings (RayLLM's fields),
else the tokenizer's chat template, else Dream's plain format (`Human: ...` / `AI: ...` lines
ending with `AI:`). A dialog too long for the model's window loses its oldest turns first; the
system prompt is always kept. Generated text is cut at stop sequences and where the model starts
the next speaker's turn.

Tools, the calls an assistant made and the tools' answers go to a chat template that lays tools
out itself (it reads `tools`) as they are; every other prompt style gets them in the generic
format of `structured_output.py`: the tools listed in the system prompt, an assistant's calls as
`<tool_call>` blocks in its turn, and the tools' answers as a user turn of `<tool_response>` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from common.lm_protocol import dream_turns
from common.validation import RequestValidationError
from services.transformers_lm.backends import ChatMessage
from services.transformers_lm.settings import PromptFormat
from services.transformers_lm.structured_output import (
    ToolFunction,
    call_block,
    tool_response_block,
    tools_instructions,
)

# Dream's speaker names for its plain format: (bot, user) per LANGUAGE.
PLAIN_SPEAKER_NAMES = {
    "EN": ("AI", "Human"),
    "RU": ("Assistant", "Human"),
}


@dataclass(frozen=True)
class Conversation:
    """A system prompt (may be empty) and the turns after it, oldest first, ending with the user's
    (or with a tool's answer); `tools` are the functions the model is told it may call."""

    system: str
    turns: tuple[ChatMessage, ...]
    tools: tuple[ToolFunction, ...] = ()


class ContextLengthExceededError(RequestValidationError):
    """The prompt and the tokens asked for do not fit the model's window (OpenAI's `context_length_exceeded`)."""

    code = "context_length_exceeded"


def with_generic_tools(conversation: Conversation) -> Conversation:
    """The conversation with its tools, calls and tool answers written as text (the generic format)."""
    system = conversation.system
    if conversation.tools:
        system = (system + "\n\n" if system else "") + tools_instructions(conversation.tools)
    turns: list[ChatMessage] = []
    for message in conversation.turns:
        if message.role == "tool":
            block = tool_response_block(message.content)
            if turns and turns[-1].role == "user" and turns[-1].content.startswith("<tool_response>"):
                turns[-1] = ChatMessage("user", turns[-1].content + "\n" + block)
            else:
                turns.append(ChatMessage("user", block))
        elif message.tool_calls:
            blocks = "\n".join(call_block(call.name, call.arguments) for call in message.tool_calls)
            turns.append(ChatMessage(message.role, (message.content + "\n" if message.content else "") + blocks))
        else:
            turns.append(message)
    return Conversation(system, tuple(turns))


def conversation_from_dream(prompt: str, dialog_context: list[str]) -> Conversation:
    """Dream's dialog: the prompt as the system prompt, then utterances that alternate and end with the user's."""
    return Conversation(prompt, tuple(ChatMessage(role, text) for role, text in dream_turns(dialog_context)))


def conversation_from_messages(messages: list[ChatMessage], tools: tuple[ToolFunction, ...] = ()) -> Conversation:
    """OpenAI's messages: system (and developer) messages form the system prompt, in order."""
    system = "\n".join(m.content for m in messages if m.role in ("system", "developer"))
    turns = tuple(m for m in messages if m.role not in ("system", "developer"))
    return Conversation(system, turns, tools)


class PromptRenderer(Protocol):
    """One prompt style: renders a conversation, and says where the model's answer should end."""

    name: str
    takes_tools: bool  # lays tools and calls out itself; else they come in the generic format

    def render(self, conversation: Conversation) -> str: ...

    def turn_boundaries(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class PlainRenderer:
    """Dream's plain format: the prompt, then `Name: utterance` lines, then the bot's name and a colon."""

    language: str = "EN"
    name: str = "plain"
    takes_tools: bool = False

    @property
    def speakers(self) -> tuple[str, str]:
        return PLAIN_SPEAKER_NAMES[self.language]

    def render(self, conversation: Conversation) -> str:
        bot, user = self.speakers
        lines = [f"{user if t.role == 'user' else bot}: {t.content}" for t in conversation.turns]
        head = conversation.system + "\n" if conversation.system else ""
        return head + "\n".join(lines) + f"\n{bot}:"

    def turn_boundaries(self) -> tuple[str, ...]:
        bot, user = self.speakers
        return (f"\n{user}:", f"\n{bot}:", f"{user}:")


@dataclass(frozen=True)
class ChatTemplateRenderer:
    """The tokenizer's own chat template; the model's end-of-turn token ends the answer."""

    render_chat: Callable[..., str]
    name: str = "chat_template"
    takes_tools: bool = False

    def render(self, conversation: Conversation) -> str:
        messages = [ChatMessage("system", conversation.system)] if conversation.system else []
        if self.takes_tools and conversation.tools:
            return self.render_chat(messages + list(conversation.turns), [tool.as_openai() for tool in conversation.tools])
        return self.render_chat(messages + list(conversation.turns))

    def turn_boundaries(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class PromptFormatRenderer:
    """A RayLLM-style `prompt_format` from the settings."""

    prompt_format: PromptFormat
    name: str = "prompt_format"
    takes_tools: bool = False

    def _fill(self, template: str, instruction: str, system: str = "") -> str:
        # str.replace, not str.format: utterances may hold braces.
        return template.replace("{system}", system).replace("{instruction}", instruction)

    def render(self, conversation: Conversation) -> str:
        layout = self.prompt_format
        clean = (lambda text: text.strip()) if layout.strip_whitespace else (lambda text: text)
        system_message = clean(conversation.system) or layout.default_system_message
        system_text = self._fill(layout.system, system_message) if system_message else ""
        parts: list[str] = [] if layout.system_in_user else [system_text]
        system_pending = layout.system_in_user
        for turn in conversation.turns:
            if turn.role == "user":
                parts.append(self._fill(layout.user, clean(turn.content), system_text if system_pending else ""))
                system_pending = False
            else:
                parts.append(self._fill(layout.assistant, clean(turn.content)))
        return "".join(parts) + layout.trailing_assistant

    def turn_boundaries(self) -> tuple[str, ...]:
        layout = self.prompt_format
        boundaries = []
        for template in (layout.user, layout.assistant):
            prefix = template.replace("{system}", "").split("{instruction}")[0].strip()
            if prefix:
                boundaries.append(prefix)
        return tuple(boundaries)


@dataclass(frozen=True)
class BuiltPrompt:
    """Prompt token ids ready for the engine, the text they came from, and where to cut the answer."""

    token_ids: tuple[int, ...]
    text: str
    stop_sequences: tuple[str, ...]
    dropped_turns: int = 0
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the answer (the model's EOS and special stop tokens)


@dataclass
class PromptBuilder:
    """Renders conversations for one model and fits them into its context window."""

    renderer: PromptRenderer
    encode: Callable[[str], list[int]]
    context_length: int
    stop_sequences: tuple[str, ...] = ()  # the service's and the model's, added to every request's
    stop_token_ids: tuple[int, ...] = ()  # the model's end-of-generation ids and special stop tokens
    system_prompt: str = ""  # used when a conversation brings none (a named variant's)

    def build(
        self,
        conversation: Conversation,
        max_new_tokens: int,
        request_stops: tuple[str, ...] = (),
        field: str | None = None,
        *,
        max_length: int | None = None,
        rewrite: Callable[[str], str] | None = None,
    ) -> BuiltPrompt:
        """Render, dropping the oldest turns until prompt plus `max_new_tokens` fits the window.

        With `max_length` (transformers': prompt and answer together) instead, the prompt must
        leave at least one token under it and the window; the answer gets what is left. `rewrite`
        changes the rendered text before it is tokenized (Dream's replacement pairs).
        Raises RequestValidationError (naming `field`) when even the system prompt and the last
        turn leave no room for the answer.
        """
        if max_length is not None:
            budget = min(self.context_length, max_length) - 1
            room = f"one new token under max_length {max_length}"
        else:
            budget = self.context_length - max_new_tokens
            room = f"{max_new_tokens} new tokens"
        if budget <= 0:
            raise ContextLengthExceededError(
                f"{room} leaves no room for a prompt in the model's window of {self.context_length} tokens",
                field,
            )
        stops = tuple(dict.fromkeys((*request_stops, *self.stop_sequences, *self.renderer.turn_boundaries())))
        if not conversation.system and self.system_prompt:
            conversation = Conversation(self.system_prompt, conversation.turns)
        turns = conversation.turns
        for dropped in range(len(turns)):
            kept = Conversation(conversation.system, turns[dropped:], conversation.tools)
            if not self.renderer.takes_tools:
                kept = with_generic_tools(kept)
            try:
                text = self.renderer.render(kept)
            except Exception:  # noqa: BLE001 - e.g. a template that needs the user first: drop one more
                continue
            if rewrite is not None:
                text = rewrite(text)
            token_ids = self.encode(text)
            if len(token_ids) <= budget:
                return BuiltPrompt(tuple(token_ids), text, stops, dropped, self.stop_token_ids)
        raise ContextLengthExceededError(
            f"the prompt and the last utterance take more than {budget} tokens: the model's window is "
            f"{self.context_length} tokens and {room} are kept for the answer; shorten them "
            "or ask for fewer new tokens",
            field,
        )


def cut_at_stop_sequences(text: str, stop_sequences: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop sequence, and whether one was found."""
    positions = [index for index in (text.find(stop) for stop in stop_sequences) if index >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


@dataclass
class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that are safe to send, stopping at stop sequences.

    Text that might be the start of a stop sequence, or half of a multi-byte character, is held
    back until the next token decides it.
    """

    decode: Callable[[list[int]], str]
    stop_sequences: tuple[str, ...] = ()
    # Applied to the decoded text before stop sequences are looked for (Dream's replacement pairs);
    # with one, read the result with `final_text()`, since it may rewrite text already emitted.
    transform: Callable[[str], str] | None = None
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    stopped: bool = False

    def add(self, token_id: int) -> str:
        """The new text this token makes safe to send ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self._decoded()
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for its other bytes
        cut, found = cut_at_stop_sequences(text, self.stop_sequences)
        if found:
            self.stopped = True
            return self._emit_up_to(cut)
        return self._emit_up_to(text[: len(text) - self._held_suffix_length(text)])

    def finish(self) -> str:
        """Whatever was held back, once the stream has ended without a stop sequence."""
        if self.stopped:
            return ""
        text = self._decoded()
        return self._emit_up_to(text)

    def final_text(self) -> str:
        """The whole text of the tokens read, cut at the first stop sequence (after `transform`)."""
        return cut_at_stop_sequences(self._decoded(), self.stop_sequences)[0]

    def _decoded(self) -> str:
        text = self.decode(self.token_ids)
        return self.transform(text) if self.transform is not None else text

    @property
    def text(self) -> str:
        return self.emitted

    def _emit_up_to(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece

    def _held_suffix_length(self, text: str) -> int:
        longest = 0
        for stop in self.stop_sequences:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
