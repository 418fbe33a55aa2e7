"""The tests of the images. Those that run the distribution in Docker need root, a Docker engine
(started by `parley engine` when none runs) and minutes of builds, so they run only through
`make test-docker` (PARLEY_DOCKER_TESTS=1); the Dockerfile lint runs everywhere."""

import os

if os.environ.get("PARLEY_DOCKER_TESTS") != "1":
    collect_ignore = ["test_distribution_in_docker.py", "test_bundle_in_docker.py", "test_multiskill_in_docker.py"]
