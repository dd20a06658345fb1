"""Prefect flows (wiring only) and the `vidtune` CLI."""

import vidtune.tasks as _tasks  # noqa: F401  (sets vidtune's Prefect defaults before prefect is imported)
