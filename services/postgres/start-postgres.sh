#!/bin/sh
# Start PostgreSQL in the foreground. On the first start (an empty volume), create the cluster in
# PGDATA with POSTGRES_USER, its POSTGRES_PASSWORD (scram-sha-256 over TCP) and the database
# POSTGRES_DB; later starts reuse it. Listens on PORT on every address of the container.
set -eu
: "${PGDATA:?}" "${POSTGRES_USER:?}" "${POSTGRES_DB:?}" "${PORT:=5432}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "start-postgres: POSTGRES_PASSWORD is not set: set it (compose: PARLEY_POSTGRES_PASSWORD in .env)" >&2
    exit 1
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "start-postgres: creating the cluster in $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password_file" -E UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 --no-instructions
    rm -f "$password_file"
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # Only the socket while the database is made: nothing can connect before it exists.
        "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -c port=$PORT -k /tmp" -w start
        "$bin/createdb" -h /tmp -p "$PORT" -U "$POSTGRES_USER" "$POSTGRES_DB"
        "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop
    fi
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c port="$PORT" -k /tmp
