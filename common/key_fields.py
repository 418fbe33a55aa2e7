"""Which names carry credentials: the rule that keeps keys out of the dialog state and the logs.

A turn may carry an LLM's API key as a field named after its env var (Dream's way), e.g.
`OPENAI_API_KEY`, at the top level or nested anywhere in it (`lm_service_kwargs`, `attributes`),
and Dream's skills send keys on to an LLM as "sending variables", lists named in the plural
(`openai_api_keys: [...]`). The agent passes such fields to the skills for that turn only and never
stores or logs them; it recognises them by name alone, with this rule. A card's `key_env_vars` must
therefore match it too (`parley` refuses other names), or a key sent under that name would be stored.

`TOKEN` has no plural form here: `max_tokens` and `prompt_tokens` are counts, not credentials.
"""

from __future__ import annotations

import re

KEY_FIELD = re.compile(
    r"^(?:[A-Za-z0-9]+[_-])*"
    r"(API_?KEYS?|KEYS?|TOKEN|SECRETS?|CREDENTIALS?|PASSWORDS?|ORGANIZATIONS?|SCOPES?|AUTHORIZATION)$",
    re.I,
)
KEY_FIELD_ENDINGS = "_API_KEY, _KEY, _TOKEN, _SECRET, _CREDENTIALS, _PASSWORD, _ORGANIZATION or _SCOPE"


def is_key_field(name: str) -> bool:
    """A request field (or env var) whose value is a credential."""
    return bool(KEY_FIELD.match(name))
