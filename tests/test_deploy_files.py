"""The deploy files (Dockerfile, render.yaml, Nx project.json) name commands that exist:
Makefile targets, `uvian-worker` subcommands and their options, settings the worker reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

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


def cli_commands(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "uvian_worker", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


def test_deploy_files_name_real_commands() -> None:
    help_text = cli_commands()
    subcommands = set(re.findall(r"^ {4}([a-z][\w-]*)\s", help_text, re.MULTILINE))
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    assert {"run", "health", "stats"} <= subcommands

    project = json.loads((ROOT / "project.json").read_text())
    assert (project["name"], project["projectType"]) == ("uvian-worker", "application")
    assert {"serve", "start-worker", "build", "install", "test", "lint"} <= set(project["targets"])
    for target in project["targets"].values():
        assert target["executor"] == "nx:run-commands"
        program, *words = target["options"]["command"].split()
        if program == "make":
            assert words[0] in targets
        else:
            assert (ROOT / program).name in ("uvian-worker", "pip") and program.startswith(".venv/")
            if program.endswith("uvian-worker"):
                assert words[0] in subcommands

    text = (ROOT / "render.yaml").read_text()
    try:
        import yaml
    except ImportError:
        render = parse_yaml_subset(text)
    else:
        render = yaml.safe_load(text)
        assert parse_yaml_subset(text) == render
    (service,) = render["services"]
    assert (service["type"], service["runtime"]) == ("worker", "docker")
    assert (ROOT / service["dockerfilePath"]).is_file()
    assert service["dockerCommand"].split()[:2] == ["uvian-worker", "run"]
    env = {var["key"]: var for var in service["envVars"]}
    secrets = {"DATABASE_URL", "REDIS_URL", "RUNPOD_API_KEY", "RUNPOD_ENDPOINT_ID"}
    assert all(env[name] == {"key": name, "sync": False} for name in secrets)
    assert all("value" in var for name, var in env.items() if name not in secrets)
    assert {name.lower() for name in env} <= set(Settings.model_fields)

    instructions = [
        (line.split(maxsplit=1)[0], line.split(maxsplit=1)[1])
        for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line and not line.startswith((" ", "#"))
    ]
    found = {
        name: [args for kind, args in instructions if kind == name] for name, _ in instructions
    }
    assert found["FROM"] == ["python:3.11-slim"]
    assert found["USER"] and found["USER"][-1].split(":")[0] not in ("root", "0")
    assert json.loads(found["CMD"][-1]) == ["uvian-worker", "run"]
    probe = json.loads(found["HEALTHCHECK"][-1].split(" CMD ", 1)[1])
    assert probe[:2] == ["uvian-worker", "health"]
    assert all(option in cli_commands("health") for option in probe[2:])
    assert any("PYTHONUNBUFFERED=1" in env and "LOG_FORMAT=json" in env for env in found["ENV"])
    assert not any(
        secret in line for secret in secrets for line in found["ENV"] + found.get("ARG", [])
    )
    runs = " ".join(found["RUN"])
    assert "pip install -r requirements.lock" in runs and "pip install --no-deps ." in runs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "node_modules", ".env", ".pytest_cache"} <= set(ignored)
