#!/bin/sh
# Entry point of the PostgreSQL stand-in image: on first start (an empty data directory) it creates the cluster
# with POSTGRES_USER (default postgres) as superuser, password POSTGRES_PASSWORD (required) and database
# POSTGRES_DB (default: the user's name), then runs the server on every interface, password-authenticated.
set -eu

if [ "${1:-}" != postgres ]; then
    exec "$@"
fi
shift
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?is not set: the database would be open to every container on its network}"
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$password_file"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$password_file" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$password_file"
    # Other containers reach it through the compose network, not only through 127.0.0.1.
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        echo "CREATE DATABASE \"$database\" OWNER \"$user\";" | postgres --single -j -D "$PGDATA" postgres >/dev/null
    fi
    echo "postgres-entrypoint: created the cluster in $PGDATA with database $database for $user"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
