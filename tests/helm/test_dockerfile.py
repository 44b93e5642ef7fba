"""The Dockerfile installs elasticd the way the README does, and the chart runs what it builds.

No Docker engine here: these tests read the Dockerfile, README, .ci/install, .dockerignore and
the chart, and fail when they fall out of step.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import yaml

from tests.helm.chart import CHART, REPO, container, pod_spec, render

DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")
CI_INSTALL = (REPO / ".ci" / "install").read_text(encoding="utf-8")
INSTALL = "bash .ci/install"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return out


def _runs() -> list[str]:
    return [args for word, args in _instructions() if word == "RUN"]


def test_readme_quickstart_and_dockerfile_both_install_with_ci_install() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert INSTALL in quickstart
    installs = [run for run in _runs() if INSTALL in run]
    assert len(installs) == 1
    # The repository is in the image before the install step runs.
    words = [word for word, _ in _instructions()]
    assert words.index("COPY") < words.index("RUN", words.index("COPY"))


def _pip_installs() -> list[list[str]]:
    """The package arguments of every `pip install` in a RUN (flags and their values dropped)."""
    out = []
    for run in _runs():
        for command in re.split(r"&&|;|\bthen\b", run):
            words = command.split()
            if "pip" in words and "install" in words:
                args = words[words.index("install") + 1 :]
                packages, skip = [], False
                for word in args:
                    if skip:
                        skip = False
                    elif word in ("--index-url", "-i"):
                        skip = True
                    elif not word.startswith("--"):
                        packages.append(word)
                out.append(packages)
    return out


def test_dockerfile_installs_elasticd_only_through_ci_install_and_its_s3_extra() -> None:
    (pin,) = set(re.findall(r"torch==([0-9.]+)", CI_INSTALL))
    # The CPU torch goes in first (ci/install keeps an installed torch), then the s3 extra.
    assert _pip_installs() == [[f'"torch=={pin}"'], ["-e", '".[s3]"']]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "s3" in extras["optional-dependencies"]


def test_base_image_is_a_build_argument_defaulting_to_cuda() -> None:
    instructions = _instructions()
    assert instructions[0] == ("ARG", instructions[0][1])
    name, _, default = instructions[0][1].partition("=")
    assert name == "BASE_IMAGE"
    assert "cuda" in default
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert "TORCH_INDEX_URL" in DOCKERFILE  # the CPU variant's build argument


def test_entrypoint_is_elasticd_and_the_chart_runs_it_as_the_image_user() -> None:
    entry = [json.loads(args) for word, args in _instructions() if word == "ENTRYPOINT"]
    assert entry == [["elasticd"]]
    user = [args for word, args in _instructions() if word == "USER"]
    uid, _, gid = user[-1].partition(":")
    security = pod_spec(render())["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert container(render())["command"] == ["elasticd"]


def test_dockerignore_keeps_everything_the_install_reads() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", ".ci/install", "examples/tiny.yaml"]
    needed += [f"{pkg}/__init__.py" for pkg in ("daemon", "elastic", "model", "ops")]
    for path in needed:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = [p for p in patterns if any(fnmatch.fnmatch(x, p) for x in prefixes)]
        assert hits == [], f"{path} is excluded by {hits}"
    assert {".git", "runs", ".cache"} <= set(patterns)


def test_chart_app_version_is_the_package_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == project["version"]
    assert container(render())["image"].endswith(f":{project['version']}")
