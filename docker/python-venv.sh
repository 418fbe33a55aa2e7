#!/bin/sh
# The build stage every Python service's image shares (services/*/Dockerfile, skills/*/Dockerfile):
# trust the site's extra CA certificates (docker/ca-certificates/*.crt), then pip install the
# arguments into /opt/venv, created on first use. pip's index settings come from the build args
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST, which each Dockerfile declares.
#
#   RUN --mount=type=bind,source=docker,target=/site --mount=type=cache,target=/root/.cache/pip \
#       /site/python-venv.sh -r /tmp/requirements.txt
set -eu
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
if ls /site/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /site/ca-certificates/*.crt /usr/local/share/ca-certificates/
fi
update-ca-certificates >/dev/null
[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
/opt/venv/bin/pip install "$@"
find /opt/venv -name __pycache__ -prune -exec rm -rf {} +
