#!/usr/bin/env bash
# Services for the integration tests that start real stores (tests/test_shared_stores.py), on a
# fresh Debian/Ubuntu machine with Python. Called by .ci/run before `make test`; safe to re-run.
#   .ci/install-services.sh
# - PostgreSQL, from apt: the tests run their own throwaway cluster (initdb + pg_ctl from
#   /usr/lib/postgresql/<major>/bin, as the 'postgres' user when run as root).
# - The S3 server (moto), boto3, psycopg2 and kubernetes-validate are Python packages: they
#   come with the `dev` extra of pyproject.toml (`make setup` installs it).
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
    echo "install-services: PostgreSQL already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
# The tests never use the distribution's own cluster: don't create one (nothing left listening
# on 5432, nothing to clash with a developer's PostgreSQL).
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/lorafleet-ci.conf >/dev/null

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends postgresql
echo "install-services: installed $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
