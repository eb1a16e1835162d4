#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised: a second database for Prefect's
# server beside MLflow's (POSTGRES_DB). Names come from the environment; no credentials here.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"${PREFECT_DB:-prefect}\";"
