# MLflow tracking server and model registry, backed by PostgreSQL, proxying artifacts from /mlartifacts.
FROM python:3.11-slim

# Keep equal to the worker's MLFLOW_VERSION (infra/Dockerfile): client and server of one release.
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3"

# Not root; named volumes mounted on these folders take their owner from the image on first use.
RUN useradd --system --create-home --uid 10001 mlflow \
    && mkdir -p /mlartifacts /var/lib/mlflow \
    && chown mlflow:mlflow /mlartifacts /var/lib/mlflow
USER mlflow
WORKDIR /var/lib/mlflow
EXPOSE 5000
