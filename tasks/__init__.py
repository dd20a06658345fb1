"""Curation stages (plain functions) and the Prefect tasks that wrap them."""

import os

# No outbound network by default: Prefect's server analytics and cloud telemetry are opt-in for vidtune users.
# setdefault keeps an explicit user choice; this runs before any `prefect` import in the project.
for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "DO_NOT_TRACK": "1",
    # Where Prefect's temporary server is still used (VIDTUNE_LOCAL_SERVER=0, or flows called from Python), its first
    # start on a new machine migrates a new database: far past the 20 s Prefect waits by default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
}.items():
    os.environ.setdefault(_name, _value)
