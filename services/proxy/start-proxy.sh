#!/bin/sh
# Write nginx's config from PROXY_PASS (the host:port that runs the real service) and PORT, then
# run nginx in the foreground.
set -eu
: "${PROXY_PASS:?set PROXY_PASS to the host:port of the service to forward to, e.g. llm-host:8180}"
: "${PORT:?set PORT to the port this proxy listens on}"
case "$PROXY_PASS" in
    *[!A-Za-z0-9.:_-]*) echo "PROXY_PASS must be host:port, got: $PROXY_PASS" >&2; exit 2 ;;
esac
sed -e "s|@PROXY_PASS@|$PROXY_PASS|g" -e "s|@PORT@|$PORT|g" \
    /etc/nginx/parley-proxy.conf.template >/etc/nginx/conf.d/parley-proxy.conf
echo "proxy: 0.0.0.0:$PORT -> $PROXY_PASS"
exec nginx -g 'daemon off;'
