"""The distribution on a two-node swarm. It needs root, a Docker engine (`parley engine`, as make
test-docker), the images make test-docker builds, and it makes a network namespace, a second engine
and a registry, so it runs only through `make test-multinode` (PARLEY_MULTINODE_TESTS=1)."""

import os

if os.environ.get("PARLEY_MULTINODE_TESTS") != "1":
    collect_ignore = ["test_two_node_swarm.py"]
