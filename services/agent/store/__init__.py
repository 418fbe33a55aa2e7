"""Where the agent keeps dialogs: one `DialogStore` interface, a backend per URL scheme.

`open_store(STATE_URL)` picks the backend by the URL's scheme: `sqlite:///PATH` (one file, one
agent process; the default) or `postgresql://USER:PASSWORD@HOST:PORT/DB` (one database that any
number of agent processes share). Backends register their scheme (`register_store`); none is
chosen by an if/else on the scheme. Both keep the same tables (services/agent/store/sql.py) and
apply its migrations when they open.

The contract every backend keeps, which tests/test_store.py runs against each of them:
- a user has at most one active dialog; `active_dialog` creates it (and the user) when missing;
- `append_turn` stores the user's utterance and the bot's answer together, after every turn
  stored before it, once: a turn handed in twice (same utterance ids) is stored once;
- readers see whole turns only, oldest first.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import Callable, ClassVar
from urllib.parse import urlsplit, urlunsplit

from common.validation import StartupError

__all__ = ["DialogStore", "StoreError", "open_store", "register_store", "redact_url", "new_id", "now"]

# Modules whose store classes register themselves when imported (each imports its driver lazily).
STORE_MODULES = ("services.agent.store.sqlite", "services.agent.store.postgres")


class StoreError(StartupError, RuntimeError):
    """The state cannot be opened or used; the message says why and how to fix it (never a password).
    At start it stops the agent with that one line, as any StartupError does."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}"))


class DialogStore(ABC):
    """All reads and writes of the dialog state. Thread-safe: one store serves every request thread."""

    # URL schemes this backend opens (e.g. ("sqlite",)); set by each backend.
    schemes: ClassVar[tuple[str, ...]] = ()
    # Whether several agent processes (replicas) may share this store.
    shared: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def open(cls, url: str, *, pool_size: int, connect_timeout: float) -> "DialogStore":
        """Connect, apply migrations, and return the store; StoreError when that cannot be done."""

    @abstractmethod
    def active_dialog(self, user_external_id: str, last_utterances: int | None = None) -> dict:
        """The user's active dialog as Dream's dict (created with the user if there is none).

        With `last_utterances`, only that many of the latest utterances: what a turn's services see.
        """

    @abstractmethod
    def close_active_dialog(self, user_external_id: str) -> None:
        """Dream's /start and /close: the user's next turn starts a new dialog."""

    @abstractmethod
    def append_turn(self, dialog_id: str, human_utterance: dict, bot_utterance: dict,
                    human_attributes: dict, bot_attributes: dict, human_attributes_reset_to: dict | None = None) -> None:
        """Store the user's utterance and the bot's answer at the end of the dialog, together; the
        user's attributes get `human_attributes` merged over them (over `human_attributes_reset_to`
        instead, when the turn reset them)."""

    @abstractmethod
    def dialog(self, dialog_id: str, last_utterances: int | None = None) -> dict | None:
        """A dialog as Dream's dict, utterances oldest first; None when there is no such dialog."""

    @abstractmethod
    def dialog_ids_of(self, user_external_id: str) -> list[str]:
        """The ids of the user's dialogs, oldest first."""

    @abstractmethod
    def describe(self) -> str:
        """Where the state lives, for logs (no password)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections."""


_STORES: dict[str, type[DialogStore]] = {}


def register_store(cls: type[DialogStore]) -> type[DialogStore]:
    """Class decorator: `cls` opens URLs of its `schemes`."""
    for scheme in cls.schemes:
        _STORES[scheme] = cls
    return cls


def store_class(url: str) -> type[DialogStore]:
    import importlib

    for module in STORE_MODULES:
        importlib.import_module(module)
    scheme = urlsplit(url).scheme.lower()
    cls = _STORES.get(scheme)
    if cls is None:
        known = ", ".join(f"{name}://" for name in sorted(_STORES))
        raise StoreError(f"STATE_URL: unknown scheme {scheme + '://' if scheme else '(none)'} in {redact_url(url)!r}; use one of {known}")
    return cls


def open_store(url: str, *, pool_size: int = 10, connect_timeout: float = 60.0,
               log: Callable[[str], None] | None = None) -> DialogStore:
    """The store for STATE_URL, opened (migrations applied)."""
    store = store_class(url).open(url, pool_size=pool_size, connect_timeout=connect_timeout)
    if log is not None:
        log(f"dialog state: {store.describe()}")
    return store
