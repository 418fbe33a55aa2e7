"""A shipped distribution as `parley up` runs it in a test: a scratch checkout whose code, cards and
prompts are this one's (links), with the distribution's folder copied and one overlay of the test's
own (`test.yml`): a greedy, short generative config for every prompted skill (answers reproducible
and quick on a busy CPU) and roomy timeouts for the real model (its pipeline copy gets them too, as
the agent waits for each skill as long as its pipeline entry says)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from support.servers import REPO_ROOT

LINKED = ["services", "skills", "common", "components", "docker-compose.yml", ".env", "components.tsv"]
# Generation on a shared 2-core machine can take tens of seconds: roomy, and not what is tested here.
TURN_TIMEOUT = 300
GREEDY = {"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 24}


def write_scratch_checkout(root: Path, dist: str) -> Path:
    """The checkout; its `assistant_dists/<dist>/test.yml` is the test's overlay."""
    root.mkdir(parents=True)
    for name in LINKED:
        (root / name).symlink_to(REPO_ROOT / name)
    folder = root / "assistant_dists" / dist
    shutil.copytree(REPO_ROOT / "assistant_dists" / dist, folder)
    greedy = folder / "greedy_generative_config.json"
    greedy.write_text(json.dumps(GREEDY))
    pipeline = json.loads((folder / "pipeline_conf.json").read_text())
    skills = pipeline["services"]["skills"]
    for entry in skills.values():
        entry["connector"]["timeout"] = TURN_TIMEOUT - 10
    (folder / "pipeline_test.json").write_text(json.dumps(pipeline, indent=2, ensure_ascii=False))
    services = {
        "agent": {"environment": {"PIPELINE_CONFIG": str(folder / "pipeline_test.json"), "RESPONSE_TIME_LIMIT": str(TURN_TIMEOUT)}},
    }
    for entry in skills.values():
        services[entry["source"]["container"]] = {
            "environment": {"GENERATIVE_SERVICE_CONFIG": str(greedy), "GENERATIVE_TIMEOUT": str(TURN_TIMEOUT - 20)},
        }
    (folder / "test.yml").write_text(json.dumps({"services": services}, indent=2))
    return root
