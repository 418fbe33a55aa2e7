"""Which names carry credentials: the rule the agent uses to keep keys out of the dialog state.

A turn may carry an LLM's API key as a top-level field named after its env var (Dream's way), e.g.
`OPENAI_API_KEY`. The agent passes such fields to the skills for that turn only and never stores or
logs them; it recognises them by name alone, with this rule. A card's `key_env_vars` must therefore
match it too (`parley` refuses other names), or a key sent under that name would be stored.
"""

from __future__ import annotations

import re

KEY_FIELD = re.compile(r"^(?:[A-Za-z0-9]+_)*(API_?KEY|KEY|TOKEN|SECRET|CREDENTIALS?|PASSWORD|ORGANIZATION|SCOPE)$", re.I)
KEY_FIELD_ENDINGS = "_API_KEY, _KEY, _TOKEN, _SECRET, _CREDENTIALS, _PASSWORD, _ORGANIZATION or _SCOPE"


def is_key_field(name: str) -> bool:
    """A request field (or env var) whose value is a credential."""
    return bool(KEY_FIELD.match(name))
