"""The distribution as a Docker Swarm stack on a real single-node swarm. It needs root, a Docker
engine (`parley engine`, as make test-docker) and the images make test-docker builds, so it runs
only through `make test-swarm` (PARLEY_SWARM_TESTS=1)."""

import os

if os.environ.get("PARLEY_SWARM_TESTS") != "1":
    collect_ignore = ["test_stack_in_swarm.py"]
