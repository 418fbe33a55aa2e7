"""`parley up` runs a distribution's services as real processes: order, rewriting, output, failures, Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support.servers import free_port
from support.tiny_dist import write_tiny_distribution

from parley.repo import Repo
from parley.up import UpError, run_distribution
from parley.up.dockerfile import parse_dockerfile

PARLEY = [sys.executable, "-m", "parley"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def _wait_until(condition, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_distribution(tmp_path / "checkout", free_port(), free_port())


def _start_cli(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*PARLEY, "up", "tiny", "--repo", str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _read_until_ready(process: subprocess.Popen, timeout: float = 60) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.strip() == "PARLEY_READY":
            return lines
    raise AssertionError(f"no PARLEY_READY; stdout so far: {lines}; stderr: {process.stderr.read() if process.poll() is not None else ''}")


def test_dockerfile_final_stage_gives_env_workdir_and_cmd_with_build_args():
    dockerfile = """
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS build
ENV IGNORED=1
FROM ${BASE_IMAGE}
ARG SERVICE_PORT=8180
ARG MODEL=default-model
ENV PYTHONPATH=/app \\
    SERVICE_PORT=${SERVICE_PORT} \\
    MODEL=${MODEL}
WORKDIR /app/services/transformers_lm
CMD ["gunicorn", "--config", "python:common.gunicorn_conf", "server:app"]
"""
    image = parse_dockerfile(dockerfile, {"SERVICE_PORT": "8191"})

    assert image.env == {"PYTHONPATH": "/app", "SERVICE_PORT": "8191", "MODEL": "default-model"}
    assert image.workdir == "/app/services/transformers_lm"
    assert image.cmd == ["gunicorn", "--config", "python:common.gunicorn_conf", "server:app"]


def test_services_start_in_dependency_order_with_hostnames_rewritten_to_localhost(tiny: Path, tmp_path: Path):
    with run_distribution(Repo(tiny), "tiny", free_ports=True, state_dir=tmp_path / "state") as running:
        beta = requests.get(running.url("beta") + "/env", timeout=5).json()
        alpha_url = running.url("alpha")

        assert beta["upstream_healthy_at_start"] is True  # beta started only once alpha was healthy
        assert beta["env"]["UPSTREAM_URL"] == f"{alpha_url}/hello"
        assert f'"{alpha_url}/hello"' in beta["config"]  # the JSON file an env value names is rewritten too
        assert requests.get(running.url("beta") + "/fetch", timeout=5).json() == {"upstream": '{"greeting": "hello from alpha"}'}
        assert beta["cwd"] == str(tiny / "services" / "beta")  # WORKDIR /app/... is the checkout
        assert beta["env"]["PYTHONPATH"] == str(tiny)
        assert beta["env"]["DATA_DIR"] == str(tmp_path / "state" / "rootfs" / "var" / "lib" / "tiny")


def test_container_paths_in_the_compose_environment_land_in_the_state_dir_not_on_the_host(tmp_path: Path):
    checkout = write_tiny_distribution(
        tmp_path / "checkout", free_port(), free_port(), beta_environment={"STATE_FILE": "/var/lib/tiny-state/db.sqlite3"}
    )

    with run_distribution(Repo(checkout), "tiny", free_ports=True, state_dir=tmp_path / "state") as running:
        beta = requests.get(running.url("beta") + "/env", timeout=5).json()

    assert beta["env"]["STATE_FILE"] == str(tmp_path / "state" / "rootfs" / "var" / "lib" / "tiny-state" / "db.sqlite3")


def test_an_unknown_distribution_is_refused_naming_the_known_ones(tiny: Path):
    process = subprocess.run([*PARLEY, "up", "nosuch", "--repo", str(tiny)], capture_output=True, text=True, timeout=60)

    assert process.returncode == 1
    assert "no distribution 'nosuch' (no assistant_dists/nosuch/docker-compose.override.yml); known: tiny" in process.stderr


def test_a_port_already_in_use_is_refused_naming_the_service_and_port(tmp_path: Path):
    alpha_port = free_port()
    root = write_tiny_distribution(tmp_path / "checkout", alpha_port, free_port())
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", alpha_port))
        squatter.listen()

        with pytest.raises(UpError) as refused:
            with run_distribution(Repo(root), "tiny", state_dir=tmp_path / "state"):
                pass

    assert f"port {alpha_port} of service alpha is already in use" in str(refused.value)
    assert "--free-ports" in str(refused.value)


def test_a_service_that_never_becomes_healthy_is_reported_and_nothing_is_left_running(tmp_path: Path):
    alpha_port, beta_port = free_port(), free_port()
    root = write_tiny_distribution(tmp_path / "checkout", alpha_port, beta_port, beta_environment={"HEALTHY_AFTER": "3600"})

    with pytest.raises(UpError) as failed:
        # Long enough for alpha (healthy after 1 s) on a busy machine; beta never is.
        with run_distribution(Repo(root), "tiny", startup_timeout=8, state_dir=tmp_path / "state"):
            pass

    assert f"service beta did not become healthy on http://127.0.0.1:{beta_port}/health within 8s" in str(failed.value)
    assert "listening on" in str(failed.value)  # its last output lines come with the message
    for port in (alpha_port, beta_port):
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_output_is_prefixed_per_service_and_ready_lines_name_each_url(tiny: Path):
    process = _start_cli(tiny, "--free-ports")
    try:
        lines = _read_until_ready(process)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)

    assert any(line.startswith("alpha | listening on ") for line in lines), lines
    assert any(line.startswith("beta  | listening on ") for line in lines), lines
    urls = dict(line.split()[1:] for line in lines if line.startswith("PARLEY_SERVICE "))
    assert set(urls) == {"alpha", "beta"}
    assert all(url.startswith("http://127.0.0.1:") for url in urls.values())


def test_ctrl_c_stops_every_service_and_leaves_nothing_running(tiny: Path):
    process = _start_cli(tiny, "--free-ports")
    lines = _read_until_ready(process)
    urls = dict(line.split()[1:] for line in lines if line.startswith("PARLEY_SERVICE "))
    pids = [requests.get(url + "/env", timeout=5).json()["pid"] for url in urls.values()]

    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=30)

    assert code == 0, process.stderr.read()
    assert _wait_until(lambda: not any(_alive(pid) for pid in pids)), pids
    for url in urls.values():
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=2)


def test_a_service_that_dies_stops_the_others_with_a_message_naming_it(tmp_path: Path):
    root = write_tiny_distribution(tmp_path / "checkout", free_port(), free_port(), beta_environment={"DIE_AFTER": "8"})
    process = _start_cli(root, "--free-ports")
    lines = _read_until_ready(process)
    urls = dict(line.split()[1:] for line in lines if line.startswith("PARLEY_SERVICE "))
    alpha_pid = requests.get(urls["alpha"] + "/env", timeout=5).json()["pid"]

    code = process.wait(timeout=30)
    errors = process.stderr.read()

    assert code == 1
    assert "service beta exited with code 3" in errors
    assert "stopping the others" in errors
    assert _wait_until(lambda: not _alive(alpha_pid))


def test_a_services_env_file_reaches_its_process_as_compose_would_pass_it(tmp_path: Path):
    checkout = write_tiny_distribution(tmp_path / "checkout", free_port(), free_port())
    (checkout / "alpha.env").write_text("# read by compose\nSTATE_FILE=from-the-env-file.json\n")
    overlay = checkout / "assistant_dists" / "tiny" / "env-file.yml"
    overlay.write_text("services:\n  alpha:\n    env_file: [alpha.env]\n")

    with run_distribution(Repo(checkout), "tiny", free_ports=True, overlays=["env-file.yml"], state_dir=tmp_path / "state") as running:
        alpha = requests.get(running.url("alpha") + "/env", timeout=5).json()

    assert alpha["env"]["STATE_FILE"] == "from-the-env-file.json"
    assert alpha["env"]["GREETING"] == "hello from alpha"  # the compose environment as well
