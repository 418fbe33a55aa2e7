"""What schema fuzzing found, pinned as plain tests so it stays fixed."""

from __future__ import annotations

import json

from support.servers import free_port
from support.tiny_stack import DIST_PIPELINE

from services.agent.app import create_app
from services.agent.settings import Settings


def test_a_one_letter_key_sent_with_a_turn_does_not_break_the_turn(tmp_path):
    # Given a pipeline whose skill does not answer, so the last-chance service does
    pipeline = json.loads(DIST_PIPELINE.read_text())
    pipeline["services"]["skills"]["prompted_skill"]["connector"]["url"] = f"http://127.0.0.1:{free_port()}/respond"
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    client = create_app(Settings(pipeline_config=tmp_path / "pipeline.json",
                                 state_db_path=tmp_path / "state.sqlite3")).test_client()

    # When the turn carries a "key" that is a single letter of the field names ("text")
    answer = client.post("/", json={"user_id": "u", "payload": "Hi", "api_keys": {"x": "e"}})

    # Then the turn is answered and stored (the key is redacted from values, never from field names)
    assert answer.status_code == 200, answer.get_json()
    dialog = client.get(f"/api/dialogs/{answer.get_json()['dialog_id']}").get_json()
    assert [u["user"]["user_type"] for u in dialog["utterances"]] == ["human", "bot"]
