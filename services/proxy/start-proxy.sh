#!/bin/sh
# Write nginx's config from PROXY_PASS (the host:port that runs the real service), PORT and the API
# keys (PARLEY_API_KEYS, comma-separated, and/or the file PARLEY_API_KEYS_FILE, one per line, as a
# Docker secret), then run nginx in the foreground. Without keys nothing is checked, as in the
# services. A key is never printed.
set -eu
: "${PROXY_PASS:?set PROXY_PASS to the host:port of the service to forward to, e.g. llm-host:8180}"
: "${PORT:?set PORT to the port this proxy listens on}"
case "$PROXY_PASS" in
    *[!A-Za-z0-9.:_-]*) echo "PROXY_PASS must be host:port, got: $PROXY_PASS" >&2; exit 2 ;;
esac
keys=$(printf '%s\n' "${PARLEY_API_KEYS:-}" | tr ',' '\n')
if [ -n "${PARLEY_API_KEYS_FILE:-}" ]; then
    [ -r "$PARLEY_API_KEYS_FILE" ] || { echo "PARLEY_API_KEYS_FILE $PARLEY_API_KEYS_FILE cannot be read" >&2; exit 2; }
    keys=$(printf '%s\n%s\n' "$keys" "$(sed -e 's/^PARLEY_API_KEYS=//' -e '/^#/d' "$PARLEY_API_KEYS_FILE" | tr ',' '\n')")
fi
maps=/etc/nginx/conf.d/parley-keys.conf
bearer="" header="" count=0 longest=0
for key in $keys; do
    # Only characters that need no quoting in nginx's config (the services accept no others either).
    case "$key" in
        *[!A-Za-z0-9._~+/=-]*) echo "PARLEY_API_KEYS: a key holds a character other than letters, digits and . _ ~ + / = -" >&2; exit 2 ;;
    esac
    [ "${#key}" -ge 16 ] || { echo "PARLEY_API_KEYS: a key has fewer than 16 characters" >&2; exit 2; }
    bearer="$bearer    \"Bearer $key\" 1;
"
    header="$header    \"$key\" 1;
"
    count=$((count + 1))
    [ "${#key}" -le "$longest" ] || longest=${#key}
done
umask 077
if [ "$count" -eq 0 ]; then
    printf 'map $host $parley_key_ok { default 1; }\n' > "$maps"
    echo "proxy: no PARLEY_API_KEYS: every request is forwarded without a key"
else
    # A map's keys must fit its hash buckets ("Bearer " + the key, and a few bytes of nginx's own):
    # the smallest power of two from 64 that holds the longest.
    bucket=64
    while [ "$bucket" -lt $((longest + 32)) ]; do bucket=$((bucket * 2)); done
    {
        printf 'map_hash_bucket_size %s;\n' "$bucket"
        printf 'map $http_authorization $parley_bearer_ok {\n    default 0;\n%s}\n' "$bearer"
        printf 'map $http_x_api_key $parley_header_ok {\n    default 0;\n%s}\n' "$header"
        printf 'map "$parley_bearer_ok$parley_header_ok" $parley_key_ok {\n    "00" 0;\n    default 1;\n}\n'
    } > "$maps"
    echo "proxy: $count API key(s): every request but GET /health and GET /ping needs one"
fi
# GET /ping answers without a key, as in the services; the rest of / needs one.
printf 'map "$request_method $uri:$parley_key_ok" $parley_route_ok {\n    "~^(GET|HEAD) /ping:" 1;\n    "~:1$" 1;\n    default 0;\n}\n' >> "$maps"
chmod 600 "$maps"
sed -e "s|@PROXY_PASS@|$PROXY_PASS|g" -e "s|@PORT@|$PORT|g" \
    /etc/nginx/parley-proxy.conf.template >/etc/nginx/conf.d/parley-proxy.conf
echo "proxy: 0.0.0.0:$PORT -> $PROXY_PASS"
exec nginx -g 'daemon off;'
