# The Prefect server image, with FastAPI held below 0.151: from 0.151 on FastAPI rejects the explicit nulls that
# Prefect 3.8 clients send for optional body fields (`prefect deploy` fails on POST .../workers/filter with 422).
ARG PREFECT_IMAGE=prefecthq/prefect:3.8.8-python3.11
FROM ${PREFECT_IMAGE}
RUN python -m pip install --no-cache-dir "fastapi>=0.139,<0.151"
