#!/bin/sh
# certbot deploy hook: after certbot issues or renews a certificate, tell the
# LEELOO relay to load it now (it would also notice within a minute on its
# own).  The relay keeps every open connection; only new ones get the new
# certificate.
#
# Install:  sudo install -m 0755 etc/certbot-deploy-hook.sh \
#               /etc/letsencrypt/renewal-hooks/deploy/leeloo-reload
# or pass   --deploy-hook /path/to/certbot-deploy-hook.sh  to certbot.
#
# LEELOO_PIDFILE: signal the process whose pid is in this file instead of
# asking systemd (for a relay not run by the leeloo.service unit).
set -eu

if [ -n "${LEELOO_PIDFILE:-}" ]; then
    kill -HUP "$(cat "$LEELOO_PIDFILE")"
else
    systemctl reload leeloo.service
fi
echo "leeloo: asked the relay to reload its certificates for ${RENEWED_DOMAINS:-?}"
