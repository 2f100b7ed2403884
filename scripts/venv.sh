# Sourced by scripts/run.sh and scripts/test.sh (from the checkout's root):
# makes, or reuses, the checkout's own virtualenv in .venv (LEELOO_VENV
# overrides the path) and sets PY to its python.  Nothing is installed into
# the system's Python, which Debian 12 and Ubuntu 24.04 refuse (PEP 668,
# "externally-managed-environment").  The virtualenv sees the system's
# packages (--system-site-packages), so what is installed already is not
# downloaded again; pip installs into it whatever is missing or too old.

VENV="${LEELOO_VENV:-.venv}"
# (Re)made when missing, or left without pip by a "python3 -m venv" that
# ran before python3-venv was installed.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian and Ubuntu ship the venv module's pip in a package of its own.
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    fi
    rm -rf "$VENV"
    python3 -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
# Regenerates Twisted's plugin cache so that twistd finds the leeloo plugin.
PLUGIN_CACHE='from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
