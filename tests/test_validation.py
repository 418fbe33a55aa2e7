"""Unit tests (tier: in-process, no server) of common/validation.py: the one pydantic-error formatter
and body parser that every service and the CLI share. Real pydantic models of the services are
validated; nothing is faked."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from common.lm_protocol import RespondRequest
from common.validation import RequestValidationError, error_lines, field_path, parse_json, problems, validate
from services.openai_api_lm.protocol import OpenAIRespondRequest


class Card(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    port: int


def complaint(model, data) -> RequestValidationError:
    with pytest.raises(RequestValidationError) as caught:
        validate(model, data)
    return caught.value


def test_a_location_becomes_the_field_path_clients_write():
    assert field_path(("configs", 0, "top_p")) == "configs[0].top_p"
    assert field_path(("messages", 0, "content", "str")) == "messages[0].content"
    assert field_path(()) is None


def test_a_bad_value_names_its_field_in_the_message_and_the_field():
    error = complaint(RespondRequest, {"dialog_contexts": [["hi"]], "configs": [{"top_p": 3}]})
    assert error.field == "configs[0].top_p"
    assert error.message == "configs[0].top_p: Input should be less than or equal to 1"
    assert error.status == 400


def test_a_missing_field_is_said_to_be_required():
    error = complaint(RespondRequest, {})
    assert (error.field, error.message) == ("dialog_contexts", "dialog_contexts: this field is required")


def test_an_unknown_key_lists_the_keys_the_model_at_that_place_allows():
    error = complaint(RespondRequest, {"dialog_contexts": [["hi"]], "configs": [{"beams": 2}]})
    assert error.field == "configs[0].beams"
    assert "unknown key; allowed keys: do_sample," in error.message
    assert "dialog_contexts" not in error.message  # the generation config's keys, not the request's


def test_a_model_widens_its_allowed_keys_with_an_allowed_keys_classmethod():
    error = complaint(OpenAIRespondRequest, {"dialog_contexts": [["hi"]], "configs": [{"beams": 2}]})
    assert "max_tokens" in error.message and "n," in error.message


def test_a_cross_field_check_keeps_its_own_message_and_field():
    error = complaint(RespondRequest, {"dialog_contexts": [["hi"]], "prompts": ["a", "b"]})
    assert error.field == "prompts"
    assert error.message == "prompts has 2 items but dialog_contexts has 1: give one per dialog"


def test_a_prefix_goes_before_every_field():
    with pytest.raises(ValidationError) as caught:
        Card.model_validate({"name": "x", "port": "eighty"})
    assert problems(caught.value, prefix="cards[2]")[0].field == "cards[2].port"


def test_error_lines_give_one_location_colon_message_line_per_problem_for_a_cli():
    with pytest.raises(ValidationError) as caught:
        Card.model_validate({"port": "eighty", "colour": "red"})
    assert error_lines(caught.value, model=Card) == [
        "name: this field is required",
        "port: Input should be a valid integer, unable to parse string as an integer",
        "colour: unknown key; allowed keys: name, port",
    ]


def test_a_problem_with_the_whole_input_is_named_by_the_root_label():
    with pytest.raises(ValidationError) as caught:
        Card.model_validate(["not", "a", "mapping"])
    assert error_lines(caught.value, root="(card)")[0].startswith("(card): Input should be")


def test_a_body_that_is_not_an_object_is_refused_before_validation():
    with pytest.raises(RequestValidationError) as caught:
        parse_json(RespondRequest, [["hi"]])
    assert (caught.value.message, caught.value.field) == ("the request body must be a JSON object", None)
