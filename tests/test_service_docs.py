"""Each service's README tells the truth about it (tier: in-process, no server): every setting its
Settings read is a row of the README's settings table, every row is a setting it reads, and the
endpoints include `/openapi.json`. One test for the five services, so they are checked alike."""

from __future__ import annotations

import re

import pytest

from common.settings_support import ServiceSettings
from services.agent.settings import Settings as AgentSettings
from services.autoscaler.settings import Settings as AutoscalerSettings
from services.openai_api_lm.settings import Settings as OpenAIApiSettings
from services.transformers_lm.settings import Settings as TransformersSettings
from skills.prompted_skill.settings import Settings as SkillSettings
from support.servers import REPO_ROOT

SERVICES = {
    "services/agent": AgentSettings,
    "services/openai_api_lm": OpenAIApiSettings,
    "services/transformers_lm": TransformersSettings,
    "skills/prompted_skill": SkillSettings,
    "services/autoscaler": AutoscalerSettings,
}
# A table row that documents a variable: its first cell is the name in backticks, e.g. | `PROMPT` | ...
SETTING_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|", re.MULTILINE)


def settings_table(readme: str) -> str:
    """The README's "## Settings" section, up to the next heading of the same level."""
    section = readme.split("\n## Settings\n", 1)
    assert len(section) == 2, "the README has no '## Settings' section"
    return section[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("folder, settings", SERVICES.items())
def test_every_setting_is_a_row_of_the_readmes_settings_table_and_every_row_a_setting(folder, settings: type[ServiceSettings]):
    documented = SETTING_ROW.findall(settings_table((REPO_ROOT / folder / "README.md").read_text()))
    read = [variable for variables in settings.env_variables().values() for variable in variables]

    assert len(documented) == len(set(documented)), f"{folder}/README.md documents a variable twice"
    assert sorted(set(read) - set(documented)) == [], f"{folder}/README.md does not document these settings"
    assert sorted(set(documented) - set(read)) == [], f"{folder}/README.md documents settings the service does not read"


def test_a_setting_read_from_two_variables_documents_both():
    assert SkillSettings.env_variables()["prompt"] == ["PROMPT", "PROMPT_FILE"]


@pytest.mark.parametrize("folder", SERVICES)
def test_the_readme_lists_the_openapi_document(folder):
    assert "`GET /openapi.json`" in (REPO_ROOT / folder / "README.md").read_text()
