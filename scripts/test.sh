#!/bin/sh
# Installs everything the test suite needs on a fresh Debian machine, then
# runs it.  The README's test command; .ci/run runs exactly this.
set -eu
cd "$(dirname "$0")/.."

# Debian packages the end-to-end tests use (real servers on loopback, and
# headless Chromium with its driver for the page tests).
DEBS="pebble certbot chromium chromium-driver"
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

python3 -m pip install -q --disable-pip-version-check -e '.[test,device]' --config-settings editable_mode=compat
# Regenerate Twisted's plugin cache so twistd finds the leeloo plugin.
python3 -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'

# axe-core for the page tests' accessibility checks (tests/browser/node_modules, gitignored).
npm install --silent --no-save --no-audit --no-fund --prefix tests/browser axe-core@4.11.0

exec python3 -m pytest tests "$@"
