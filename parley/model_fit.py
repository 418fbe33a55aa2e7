"""A card against its model: where a card's source lies, what it derives from the model's files, and
where the two disagree.

`add-llm` writes a card from `locate_model` + the file's facts (parley.model_files) + the registry;
`parley check` then asks `card_model_problems` and `memory_problems` of every card, with the facts
of the file when it is on this machine, else with what the card's `derived` section recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.model_facts import ModelFacts
from common.model_sources import EMBEDDED_MODELS, ModelSourceError, SourceKind, gguf_weights_to_run, resolve_model_source
from parley.cards import Card, DerivedSection, ModelSection
from parley.memory import MemoryEstimate, estimate_llm_memory, parse_size, resolve_backend

# A message whose template refuses our probe dialog: no verdict on its EOS source.
_PROBE_ANSWER = "PARLEY_PROBE_ANSWER"


@dataclass(frozen=True)
class Located:
    """A card's source on this machine: its kind and, for a local one, where it lies (None: a hub id)."""

    kind: SourceKind
    location: Path | None
    requested: str


def locate_model(root: Path, source: str) -> Located:
    """Resolve a card's `model.source` (a path relative to the repository root, an embedded name, a
    file, a folder or a hub id); ModelSourceError when it cannot be used."""
    text = str(source)
    if not Path(text).expanduser().exists() and (root / text).exists():
        text = str(root / text)  # a card's path inside the repository
    resolved = resolve_model_source(text)
    location = None if resolved.kind is SourceKind.HF_ID else resolved.path
    return Located(resolved.kind, location, resolved.requested)


def derived_from(facts: ModelFacts, guessed: list[str] | None = None) -> DerivedSection:
    return DerivedSection(
        format="gguf" if facts.format == "gguf" else "transformers",
        architecture=facts.architecture,
        parameter_count=facts.parameter_count,
        quantization=facts.quantization,
        file_size=facts.file_size,
        context_window=facts.context_window,
        chat_template=bool(facts.chat_template),
        eos=list(facts.eos_tokens),
        layers=facts.layers,
        kv_heads=facts.kv_heads,
        head_dim=facts.head_dim,
        guessed=list(guessed or []),
    )


def facts_from_derived(derived: DerivedSection) -> ModelFacts:
    """What a card recorded of its model, as facts (without the template's text)."""
    return ModelFacts(
        format=derived.format,
        architecture=derived.architecture,
        file_size=derived.file_size,
        parameter_count=derived.parameter_count,
        quantization=derived.quantization,
        context_window=derived.context_window,
        # the template's text is not recorded: a comment renders to nothing, so it is not probed
        chat_template="{# not recorded in the card #}" if derived.chat_template else None,
        eos_tokens=tuple(derived.eos),
        layers=derived.layers,
        kv_heads=derived.kv_heads,
        head_dim=derived.head_dim,
    )


def derived_differences(recorded: DerivedSection, facts: ModelFacts) -> list[str]:
    """`field: card says A, the model's files say B` for each derived value that no longer holds."""
    current = derived_from(facts, recorded.guessed).model_dump()
    found = []
    for key, value in recorded.model_dump().items():
        if key != "guessed" and current[key] != value:
            found.append(f"model.derived.{key}: {value!r}, but the model's files say {current[key]!r}")
    return found


def memory_estimate(card: Card, facts: ModelFacts) -> MemoryEstimate | None:
    """What the card's service needs, from the model's dimensions at the card's context × batch slots."""
    model = card.model
    assert model is not None
    is_gguf = facts.format == "gguf"
    backend = resolve_backend(model.backend, is_gguf)
    gguf_weights = gguf_weights_to_run(model.source, model.gguf_weights) if is_gguf else "file"
    return estimate_llm_memory(
        facts,
        backend=backend,
        context_length=model.context_length,
        batch_slots=model.batch_slots,
        half_precision=model.half_precision,
        gguf_weights=gguf_weights,
    )


def assistant_turn_end(prompt_format: dict | None, facts: ModelFacts) -> str | None:
    """What a prompt format (None: the model's chat template) writes after an assistant's answer
    (e.g. `<|im_end|>\\n`); None when the template cannot be probed."""
    if prompt_format:
        template = str(prompt_format.get("assistant", "{instruction}\n"))
        return template.split("{instruction}", 1)[1] if "{instruction}" in template else None
    if not facts.chat_template:
        return None
    from services.transformers_lm.backends.chat_template import ChatTemplateError, render_chat_template

    eos = facts.eos_tokens[0] if facts.eos_tokens else None
    for messages in (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}],
    ):
        try:
            text = render_chat_template(facts.chat_template, messages, bos_token=facts.bos_token, eos_token=eos, add_generation_prompt=False)
        except (ChatTemplateError, Exception):  # noqa: BLE001 - any template failure means: no verdict
            continue
        if _PROBE_ANSWER in text:
            return text.split(_PROBE_ANSWER, 1)[1]
    return None


def card_model_problems(card: Card, facts: ModelFacts) -> list[str]:
    """`field: what is wrong` where the card disagrees with its model: a context above the window, a
    stop set without the model's EOS, a template whose end of turn nothing stops at."""
    model = card.model
    assert model is not None
    found = []
    window = facts.context_window
    if model.context_length is not None and window and model.context_length > window:
        found.append(
            f"model.context_length: {model.context_length} is above the model's window of {window} tokens; "
            f"lower it to {window} or less"
        )
    missing = [token for token in facts.eos_tokens if token not in model.stop]
    if missing:
        found.append(
            f"model.stop: misses the model's end-of-generation token(s) {', '.join(repr(t) for t in missing)}; "
            f"add them (or run `parley add-llm {card.name}`)"
        )
    if not facts.eos_tokens and not model.stop and not _has_turn_boundary(model, facts):
        found.append(
            "model.stop: the model declares no end-of-generation token and the card has no stop strings, so "
            "every answer runs to max_new_tokens; add the token its turns end with"
        )
    layouts = [("model.stop", "model.prompt_format.assistant" if model.prompt_format else "the model's chat template",
                model.prompt_format, [])]
    for name, variant in model.names.items():
        if variant.get("prompt_format"):
            layouts.append((f"model.names.{name}.stop", f"model.names.{name}.prompt_format.assistant",
                            variant["prompt_format"], list(variant.get("stop") or [])))
    for field, where, prompt_format, extra_stops in layouts:
        ending = assistant_turn_end(prompt_format, facts)
        if ending is not None and ending.strip() and not any(stop in ending for stop in [*model.stop, *extra_stops, *facts.eos_tokens]):
            found.append(
                f"{field}: {where} ends an answer with {ending.strip()!r}, which is no EOS token of the "
                f"model and not in {field}: nothing would end an answer there; add it to {field}"
            )
    return found


def _has_turn_boundary(model: ModelSection, facts: ModelFacts) -> bool:
    """Whether the prompt style cuts answers where the next speaker's turn starts: Dream's plain
    format does (`\nHuman:`), as does a prompt_format whose user template has a prefix."""
    if model.prompt_format:
        user = str(model.prompt_format.get("user", "{instruction}\n"))
        return bool(user.replace("{system}", "").split("{instruction}")[0].strip())
    return not facts.chat_template


def memory_problems(card: Card, estimate: MemoryEstimate | None) -> list[str]:
    if estimate is None:
        return []
    limit = parse_size(card.ram_usage)
    if limit < estimate.total:
        return [
            f"ram_usage: {card.ram_usage} is below the model's estimated need, {estimate.explain()}; raise it "
            f"(or lower model.context_length or model.batch_slots), then `parley generate`"
        ]
    return []


def embedded_license(source: str) -> str | None:
    embedded = EMBEDDED_MODELS.get(source)
    return embedded.license if embedded is not None else None


__all__ = [
    "Located",
    "ModelSourceError",
    "card_model_problems",
    "derived_differences",
    "derived_from",
    "embedded_license",
    "facts_from_derived",
    "locate_model",
    "memory_estimate",
    "memory_problems",
]
