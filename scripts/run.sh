#!/bin/sh
# Runs the relay from this checkout on its embedded defaults (HTTP and
# WebSocket on 127.0.0.1:8080, state in ./leeloo-data), in the checkout's
# own virtualenv (.venv, made the first time).  The README's run command;
# arguments go to twistd leeloo, e.g. sh scripts/run.sh --store memory.
set -eu
cd "$(dirname "$0")/.."
. scripts/venv.sh

"$PY" -m pip install -q --disable-pip-version-check .
"$PY" -c "$PLUGIN_CACHE"
# twistd through the virtualenv's python: with --system-site-packages an
# already installed Twisted puts no twistd script into .venv/bin.
exec "$PY" -c 'import sys; from twisted.scripts.twistd import run; sys.argv[0] = "twistd"; run()' \
    --nodaemon --pidfile= leeloo "$@"
