"""`parley list`: every LLM of the bundle as one row, from the cards alone (no model file is opened).

The memory estimate comes from what `add-llm` recorded in each card's `derived` section
(parley.model_fit), so the list is as fast as reading the cards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from common.model_sources import gguf_weights_to_run
from parley.cards import Card
from parley.generate import dist_members
from parley.memory import format_size, parse_size, resolve_backend
from parley.model_fit import facts_from_derived, memory_estimate
from parley.repo import OVERRIDE, Repo
from parley.yamlio import load_yaml_text


class ListError(ValueError):
    pass


@dataclass(frozen=True)
class LlmRow:
    """One LLM as `parley list` shows it (`--json`: these fields)."""

    name: str
    display_name: str
    kind: str  # transformers (served here) or openai (forwarded to an upstream)
    source: str
    sha256: str | None
    family: str | None
    backend: str
    quantization: str | None  # the file's
    runs_as: str | None  # what llama.cpp runs: a copy's type (Q8_0, BF16, F16), else the file's quantisation
    parameter_count: int | None
    file_size: int | None
    context_length: int | None  # served per sequence
    context_window: int | None  # the model's own
    batch_slots: int | None
    ram_estimate: int | None  # bytes: weights + KV cache + runtime
    ram_estimate_detail: str | None
    ram_usage: str  # the card's memory limit
    port: int
    url: str
    distributions: list[str]
    names: list[str]  # the model names its service answers to: the card's, its named variants, its aliases
    aliases: list[str]
    license: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _row(card: Card, dists: list[str]) -> LlmRow:
    model = card.model
    assert model is not None
    derived = model.derived
    served_here = card.kind.reads_model_files  # else an upstream's model, forwarded to
    estimate = None
    if served_here and derived is not None:
        estimate = memory_estimate(card, facts_from_derived(derived))
    if not served_here:
        backend = f"{model.api} upstream"
    else:
        backend = resolve_backend(model.backend, derived.format == "gguf" if derived else model.source.lower().endswith(".gguf"))
    runs_as = derived.quantization if derived else None
    copy = gguf_weights_to_run(model.source, model.gguf_weights) if backend == "llama_cpp" else "file"
    if copy != "file":
        runs_as = copy.upper()
    context = model.context_length
    if estimate is not None:
        context = estimate.context_length
    return LlmRow(
        name=card.name,
        display_name=card.display_name,
        kind=model.api,
        source=model.source,
        sha256=model.sha256,
        family=model.family,
        backend=backend,
        quantization=derived.quantization if derived else None,
        runs_as=runs_as,
        parameter_count=derived.parameter_count if derived else None,
        file_size=derived.file_size if derived else None,
        context_length=context,
        context_window=derived.context_window if derived else None,
        batch_slots=model.batch_slots if served_here else None,
        ram_estimate=estimate.total if estimate else None,
        ram_estimate_detail=estimate.explain() if estimate else None,
        ram_usage=card.ram_usage,
        port=card.port,
        url=f"http://127.0.0.1:{card.port}",
        distributions=dists,
        names=[card.name, *model.names, *model.aliases] if served_here else [model.source],
        aliases=list(model.aliases),
        license=model.license,
    )


def list_llms(repo: Repo, dist: str | None = None) -> list[LlmRow]:
    """Every LLM card, in name order; with `dist`, only that distribution's."""
    cards = repo.load_valid_cards()
    llm_cards = {name: card for name, card in cards.items() if card.is_llm}
    known = repo.distributions()
    if dist is not None and dist not in known:
        raise ListError(f"--dist {dist!r}: no assistant_dists/{dist}/{OVERRIDE}; known: {', '.join(known) or 'none'}")
    dists_by_llm: dict[str, list[str]] = {}
    for name in known:
        relative = repo.dist_file(name, OVERRIDE)
        document = load_yaml_text(repo.path(relative).read_text(), relative)
        for member in dist_members(document, llm_cards):
            dists_by_llm.setdefault(member, []).append(name)
    rows = [_row(card, dists_by_llm.get(name, [])) for name, card in sorted(llm_cards.items())]
    return [row for row in rows if dist is None or dist in row.distributions]


TABLE_COLUMNS = ("name", "kind", "source", "sha256", "backend", "quant", "context", "RAM est / limit", "port", "distributions", "names")


def table_rows(rows: list[LlmRow]) -> list[tuple[str, ...]]:
    """The table's cells: a short sha256, sizes for people, lists joined."""
    cells = []
    for row in rows:
        estimate = format_size(row.ram_estimate).replace(" ", "") if row.ram_estimate else "?"
        limit = format_size(parse_size(row.ram_usage)).replace(" ", "")
        cells.append(
            (
                row.name,
                row.kind,
                row.source,
                (row.sha256 or "-")[:12],
                row.backend,
                (row.quantization or "-") + (f"→{row.runs_as}" if row.runs_as and row.runs_as != row.quantization else ""),
                str(row.context_length or "-"),
                f"{estimate} / {limit}",
                str(row.port),
                ",".join(row.distributions) or "-",
                ",".join(row.names),
            )
        )
    return cells


def format_table(rows: list[LlmRow]) -> str:
    lines = [TABLE_COLUMNS, *table_rows(rows)]
    widths = [max(len(line[index]) for line in lines) for index in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines) + "\n"
