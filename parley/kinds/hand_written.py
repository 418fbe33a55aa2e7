"""The hand-written kind: a card that no other kind claims (an annotator, a selector service, a
skill of its own). Its service and overlay entries are written by hand and kept as they are;
`parley check` still verifies its port, healthcheck and published ports against its card and the
agent waits for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from parley.kinds import Kind

if TYPE_CHECKING:
    from parley.cards import Card


class HandWritten(Kind):
    name = "hand-written"
    description = "a component whose compose service is written by hand (checked against its card, never generated)"
    group = "skills"
    generated = False

    @classmethod
    def matches(cls, card: "Card") -> bool:
        return card.model is None and card.skill is None


def register_kinds(register) -> None:
    register(HandWritten)
