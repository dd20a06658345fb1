#!/usr/bin/env bash
# Runs once, on an empty data volume: MLflow gets its own database beside Prefect's ($POSTGRES_DB).
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<-SQL
	CREATE DATABASE mlflow OWNER "$POSTGRES_USER";
SQL
