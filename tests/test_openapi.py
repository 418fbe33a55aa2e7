"""Every HTTP service describes its API at GET /openapi.json: a valid OpenAPI 3.1 document, built from
the pydantic models that validate its requests, listing every route it serves."""

from __future__ import annotations

import importlib

import pytest
from openapi_spec_validator import validate

from common.openapi import DreamError, OpenAIError, build_openapi
from services.agent.app import create_app as create_agent
from services.agent.protocol import TurnRequest
from services.agent.settings import Settings as AgentSettings
from services.autoscaler.app import create_app as create_autoscaler
from services.autoscaler.settings import Settings as AutoscalerSettings
from services.openai_api_lm.app import create_app as create_openai_api_lm
from services.openai_api_lm.settings import Settings as OpenAIApiSettings
from skills.prompted_skill.app import create_app as create_skill
from skills.prompted_skill.settings import Settings as SkillSettings

SPECS = [
    "services.agent.openapi_spec",
    "skills.prompted_skill.openapi_spec",
    "services.transformers_lm.openapi_spec",
    "services.openai_api_lm.openapi_spec",
    "services.autoscaler.openapi_spec",
]
# Routes that are not part of the JSON API: the document itself, static files, the chat page.
UNDOCUMENTED = {"/openapi.json", "/static/<path:filename>", "/chat"}


@pytest.fixture(params=["agent", "prompted_skill", "openai_api_lm", "autoscaler"])
def app(request, tmp_path):
    if request.param == "autoscaler":
        return create_autoscaler(AutoscalerSettings(), start=False)
    if request.param == "agent":
        return create_agent(AgentSettings(state_db_path=tmp_path / "state.sqlite3"))
    if request.param == "prompted_skill":
        return create_skill(SkillSettings())
    return create_openai_api_lm(OpenAIApiSettings.from_env({
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "PRETRAINED_MODEL_NAME_OR_PATH": "upstream-model"}))


@pytest.mark.parametrize("module", SPECS)
def test_each_services_document_is_valid_openapi(module):
    document = build_openapi(importlib.import_module(module).API)
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_a_served_document_is_valid_and_lists_every_route_the_app_serves(app):
    document = app.test_client().get("/openapi.json").get_json()
    validate(document)
    served = {(rule.rule, method) for rule in app.url_map.iter_rules() if rule.rule not in UNDOCUMENTED
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = set()
    for path, operations in document["paths"].items():
        flask_rule = path.replace("{", "<").replace("}", ">")
        documented |= {(flask_rule, method.upper()) for method in operations}
    # GET / is the chat page (HTML), documented with POST / under the same path.
    assert served - {("/", "GET")} == documented - {("/", "GET")}


def test_request_schemas_are_the_models_that_validate_requests():
    document = build_openapi(importlib.import_module("services.agent.openapi_spec").API)
    turn = document["components"]["schemas"]["TurnRequest"]
    assert turn["required"] == ["user_id", "payload"]
    assert turn["properties"]["user_id"] == TurnRequest.model_json_schema()["properties"]["user_id"]

    lm = build_openapi(importlib.import_module("services.transformers_lm.openapi_spec").API)
    respond = lm["paths"]["/respond"]["post"]
    assert respond["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RespondRequest"}
    assert lm["components"]["schemas"]["GenerationConfig"]["additionalProperties"] is False


def test_errors_are_documented_in_the_shape_each_api_answers():
    lm = build_openapi(importlib.import_module("services.transformers_lm.openapi_spec").API)
    dream_400 = lm["paths"]["/respond"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    openai_400 = lm["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert dream_400 == {"$ref": f"#/components/schemas/{DreamError.__name__}"}
    assert openai_400 == {"$ref": f"#/components/schemas/{OpenAIError.__name__}"}
