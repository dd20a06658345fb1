"""The installed package under its own import names: a wheel built from this tree, installed into a new
virtualenv, imports every module and loads the deployments' flows from a working directory that has its own
`flows/`, `tasks/`, `training/` and `evaluation/` packages (a Prefect project's usual folders), which come first
on sys.path there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from vidtune.flows.deployments import load_deployments

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("flows", "tasks", "training", "evaluation")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new virtualenv with only the vidtune wheel installed; the dependencies come from this environment on a
    plain path (its .pth files, and so its editable vidtune, are not read). Returns its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("vidtune-*.whl")
    env = tmp / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)], check=True, capture_output=True
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    (Path(purelib.stdout.strip()) / "vidtune-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_the_wheel_imports_from_a_prefect_project_with_its_own_flows_and_tasks(installed, tmp_path):
    project = tmp_path / "user-project"
    for own in FOLDERS:
        (project / own).mkdir(parents=True)
        (project / own / "__init__.py").write_text(
            f'raise ImportError("the user project\'s own {own} package was imported")\n'
        )
    entrypoints = sorted({d["entrypoint"] for d in load_deployments(ROOT / "prefect.yaml")})
    check = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import vidtune.flows, vidtune.tasks, vidtune.training, vidtune.evaluation
        for package in (vidtune.flows, vidtune.tasks, vidtune.training, vidtune.evaluation):
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(module.name)
        from prefect.flows import load_flow_from_entrypoint
        for entrypoint in {entrypoints!r}:
            flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
            print(entrypoint, "->", flow.name, sys.modules[flow.fn.__module__].__file__)
        print("short names imported:", sorted(set(sys.modules) & {set(FOLDERS)!r}))
    """)
    result = subprocess.run([str(installed), "-c", check], cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len([line for line in lines if "-> " in line and f"{installed.parent.parent}/lib/" in line]) == len(
        entrypoints
    ), result.stdout
    assert lines[-1] == "short names imported: []"
    assert any(
        (installed.parent.parent / "lib").glob(
            "python*/site-packages/vidtune/training/model_configs/*/*/model_index.json"
        )
    )  # package data

    cli = subprocess.run(
        [str(installed.parent / "vidtune"), "curate", "--help"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "manifest.parquet" in cli.stdout, cli.stdout + cli.stderr
