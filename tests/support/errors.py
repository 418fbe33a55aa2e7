"""One assertion per JSON error shape: the Dream-compatible endpoints' and the OpenAI-compatible (`/v1`) ones'."""

from __future__ import annotations


def assert_dream_error(response, status: int, field: str | None = None) -> dict:
    """The response has `status` and the body `{"error": {"message": str, "field": ...}}`."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json() if hasattr(response, "json") and callable(response.json) else response.get_json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], body
    assert "field" in error, body
    if field is not None:
        assert error["field"] == field, body
    return error


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    """The response has `status` and OpenAI's body `{"error": {"message", "type", "param", "code"}}`."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]
