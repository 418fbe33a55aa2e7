"""Every setting of the agent and the prompted skill is documented in its README."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.agent.settings import Settings as AgentSettings
from skills.prompted_skill.settings import Settings as SkillSettings

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("settings, readme", [
    (AgentSettings, "services/agent/README.md"),
    (SkillSettings, "skills/prompted_skill/README.md"),
])
def test_every_setting_is_in_the_readme(settings, readme):
    text = (REPO_ROOT / readme).read_text()
    env_vars = [field.description.split(":")[0] for field in settings.model_fields.values()
                if field.description and field.description.split(":")[0].isupper()]
    assert env_vars
    missing = [name for name in env_vars if f"`{name}`" not in text]
    assert not missing, f"{readme} does not document {missing}"
