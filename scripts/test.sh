#!/bin/sh
# Installs everything the test suite needs on a fresh Debian machine, then
# runs it.  The README's test command; .ci/run runs exactly this.  Python
# packages go to the checkout's own virtualenv (.venv, made the first time:
# see scripts/venv.sh), never to the system's Python.
set -eu
cd "$(dirname "$0")/.."

# Debian packages the end-to-end tests use (real servers on loopback, and
# headless Chromium with its driver for the page tests), systemd for
# systemd-analyze, which checks etc/leeloo.service offline, and redis-server
# for the Redis store's tests (each starts its own on a loopback port; the
# system's service is not used).
DEBS="pebble certbot chromium chromium-driver systemd redis-server"
# npm fetches axe-core for them: NodeSource's nodejs has it, Debian packages it apart.
command -v npm >/dev/null 2>&1 || DEBS="$DEBS npm"
missing=""
for pkg in $DEBS; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

. scripts/venv.sh
"$PY" -m pip install -q --disable-pip-version-check -e '.[test,device]' --config-settings editable_mode=compat
"$PY" -c "$PLUGIN_CACHE"

# axe-core for the page tests' accessibility checks (tests/browser/node_modules, gitignored).
npm install --silent --no-save --no-audit --no-fund --prefix tests/browser axe-core@4.11.0

exec "$PY" -m pytest tests "$@"
