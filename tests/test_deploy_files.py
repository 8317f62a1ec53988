"""The deploy files (Dockerfile, render.yaml, Nx project.json) name commands that exist:
Makefile targets, `uvian-worker` subcommands and their options, settings the worker reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.support import ROOT
from uvian_worker.settings import Settings


def parse_yaml_subset(text: str) -> Any:
    """Block mappings and sequences of plain scalars: just enough YAML for render.yaml."""
    lines = [
        (len(line) - len(line.lstrip()), line.strip())
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return _yaml_block(lines, 0, lines[0][0])[0]


def _yaml_block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            lines[i] = (indent + 2, lines[i][1][2:])  # "- key: v" opens a mapping
            item, i = _yaml_block(lines, i, indent + 2)
            items.append(item)
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        key, _, rest = lines[i][1].partition(":")
        rest = rest.split(" #")[0].strip()
        i += 1
        if rest:
            mapping[key] = _yaml_scalar(rest)
        else:
            mapping[key], i = _yaml_block(lines, i, lines[i][0])
    return mapping, i


def _yaml_scalar(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.isdigit() else text.strip('"')


def cli_help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "uvian_worker", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


@pytest.fixture(scope="module")
def subcommands() -> set[str]:
    """The subcommands `uvian-worker --help` lists."""
    return set(re.findall(r"^ {4}([a-z][\w-]*)\s", cli_help(), re.MULTILINE))


SECRETS = {"DATABASE_URL", "REDIS_URL", "RUNPOD_API_KEY", "RUNPOD_ENDPOINT_ID"}


def test_nx_project_targets_run_real_commands(subcommands: set[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    make_targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))
    project = json.loads((ROOT / "project.json").read_text())
    assert (project["name"], project["projectType"]) == ("uvian-worker", "application")
    assert {"serve", "start-worker", "build", "install", "test", "lint"} <= set(project["targets"])

    for target in project["targets"].values():
        assert target["executor"] == "nx:run-commands"
        program, *words = target["options"]["command"].split()
        if program == "make":
            assert words[0] in make_targets
        elif program == ".venv/bin/uvian-worker":
            assert words[0] in subcommands
        else:
            assert program == ".venv/bin/pip"


def test_render_blueprint_is_a_worker_with_secrets_left_to_the_dashboard(
    subcommands: set[str],
) -> None:
    text = (ROOT / "render.yaml").read_text()
    try:
        import yaml
    except ImportError:
        render = parse_yaml_subset(text)
    else:
        render = yaml.safe_load(text)
        assert parse_yaml_subset(text) == render  # the fallback reads it the same way

    (service,) = render["services"]
    assert (service["type"], service["runtime"]) == ("worker", "docker")
    assert (ROOT / service["dockerfilePath"]).is_file()
    program, command = service["dockerCommand"].split()
    assert program == "uvian-worker" and command in subcommands
    env = {var["key"]: var for var in service["envVars"]}
    assert all(env[name] == {"key": name, "sync": False} for name in SECRETS)
    assert all("value" in var for name, var in env.items() if name not in SECRETS)
    assert {name.lower() for name in env} <= set(Settings.model_fields)


def dockerfile_instructions() -> dict[str, list[str]]:
    """Each instruction's arguments in order, continuation lines joined, comments left out."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line and not line.startswith((" ", "#")):
            name, arguments = line.split(maxsplit=1)
            found.setdefault(name, []).append(arguments)
    return found


def test_dockerfile_runs_the_worker_unprivileged_and_probes_its_health(
    subcommands: set[str],
) -> None:
    found = dockerfile_instructions()
    assert found["FROM"] == ["python:3.11-slim"]
    assert found["USER"][-1].split(":")[0] not in ("root", "0")
    assert json.loads(found["CMD"][-1]) == ["uvian-worker", "run"]

    probe = json.loads(found["HEALTHCHECK"][-1].split(" CMD ", 1)[1])
    assert probe[:2] == ["uvian-worker", "health"] and "health" in subcommands
    assert all(option in cli_help("health") for option in probe[2:])

    assert any("PYTHONUNBUFFERED=1" in line and "LOG_FORMAT=json" in line for line in found["ENV"])
    baked = found["ENV"] + found.get("ARG", [])
    assert not any(secret in line for secret in SECRETS for line in baked)
    runs = " ".join(found["RUN"])
    assert "pip install -r requirements.lock" in runs and "pip install --no-deps ." in runs
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "node_modules", ".env", ".pytest_cache", "tests"} <= ignored
