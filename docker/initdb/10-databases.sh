#!/bin/sh
# One PostgreSQL server, a database per service (MLflow's is created by POSTGRES_DB). The access database has its
# own role, whose password only the access service holds.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE prefect;
CREATE ROLE access LOGIN PASSWORD '${ACCESS_DB_PASSWORD}';
CREATE DATABASE access OWNER access;
REVOKE ALL ON DATABASE access FROM PUBLIC;
SQL
