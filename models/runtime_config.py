"""A model package's runtime, as Inferless declares it: ``inferless-runtime-config.yaml`` next to ``app.py``.

::

    build:
      cuda_version: "12.1.1"        # optional
      system_packages: ["libsndfile1"]
      python_packages: ["soundfile==0.12.1", "torch==2.13.0"]
      run: ["python -c 'import soundfile'"]

Start-up (``check_runtime``, before the package's ``initialize()``) checks what can be checked without
installing anything:

- every ``python_packages`` requirement against the installed distributions (``importlib.metadata``,
  names normalised, versions matched by ``packaging``'s specifiers; markers honoured, extras not
  followed): any missing or mismatched one refuses the package with one message that lists them all and
  the pip command that installs them;
- ``system_packages`` against dpkg's database where the system has one (Debian, Ubuntu): a missing one is a
  warning naming it, because the package may not need it on every path;
- ``cuda_version`` against the CUDA runtime torch was built with: older, or none (a CPU build), or no
  usable CUDA device, is a warning.

``run`` commands are not checked: they run once, when the image is built (``models/runtime_install.py``).
Unknown keys are reported as a warning, never fatal: Inferless may grow keys Rivulet does not know.
"""
from __future__ import annotations

import importlib.metadata
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from models.errors import CheckpointError

log = logging.getLogger("rivulet.package")

RUNTIME_CONFIG_FILE = "inferless-runtime-config.yaml"
DPKG_STATUS = Path("/var/lib/dpkg/status")  # dpkg's database of installed packages (Debian, Ubuntu)


class BuildSection(BaseModel):
    """The ``build:`` mapping. Lists may be empty or left blank (``system_packages:`` with nothing)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    cuda_version: str | None = None
    system_packages: tuple[str, ...] = ()
    python_packages: tuple[str, ...] = ()
    run: tuple[str, ...] = ()

    @field_validator("system_packages", "python_packages", "run", mode="before")
    @classmethod
    def _blank_is_empty(cls, value: Any) -> Any:
        return () if value is None else value

    @field_validator("cuda_version", mode="before")
    @classmethod
    def _cuda_version_is_a_version(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `cuda_version: 12.1` unquoted is a float in YAML
        if isinstance(value, str):
            try:
                Version(value)
            except InvalidVersion:
                raise ValueError(f"{value!r} is not a version like '12.1.1'") from None
        return value

    @field_validator("python_packages")
    @classmethod
    def _no_pip_options(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if entry.strip().startswith("-"):
                raise ValueError(f"{entry!r} is a pip option, not a requirement; put it in a run command")
        return value


class RuntimeConfig(BaseModel):
    """The whole file: a ``build:`` section (other top-level keys are reported as unknown)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    build: BuildSection = BuildSection()

    @field_validator("build", mode="before")
    @classmethod
    def _blank_build_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def unknown_keys(self) -> list[str]:
        """Keys Rivulet does not know, dotted (``build.python_version``)."""
        return sorted([*(self.model_extra or {}), *(f"build.{k}" for k in self.build.model_extra or {})])


def read_runtime_config(directory: str | Path) -> RuntimeConfig | None:
    """The package's runtime config, or None when it has none. Raises CheckpointError when it is malformed."""
    path = Path(directory) / RUNTIME_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from None
    if data is None:  # an empty file asks for nothing
        data = {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping with a build: section, found {type(data).__name__}")
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{path}: {problems}") from None


def installed_distributions() -> dict[str, str]:
    """Normalised name -> version of every distribution this interpreter can import (first on sys.path wins,
    as for imports)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def unmet_python_requirements(requirements: tuple[str, ...], installed: dict[str, str]
                              ) -> tuple[list[tuple[str, str]], list[str]]:
    """(unmet, unchecked): each unmet one as (requirement, why); unchecked ones are not PEP 508
    specifiers (a bare VCS URL, say), whose name cannot be known before installing them."""
    unmet, unchecked = [], []
    environment = default_environment()
    for entry in requirements:
        try:
            requirement = Requirement(entry)
        except InvalidRequirement:
            unchecked.append(entry)
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue  # not for this Python or platform
        version = installed.get(canonicalize_name(requirement.name))
        if version is None:
            unmet.append((entry, "not installed"))
        elif requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            unmet.append((entry, f"{requirement.name} {version} is installed"))
    return unmet, unchecked


def pip_install_command(requirements: list[str]) -> str:
    """The command that installs ``requirements`` into the Python running this server."""
    return shlex.join([sys.executable, "-m", "pip", "install", *requirements])


def installed_debian_packages(status_file: Path = DPKG_STATUS) -> set[str] | None:
    """The packages dpkg records as installed; None on a system without dpkg. Read from dpkg's database
    rather than by running dpkg-query: this runs on the engine thread, where gevent's patched subprocess
    cannot wait for a child."""
    try:
        text = status_file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    installed = set()
    for stanza in text.split("\n\n"):  # one stanza of "Field: value" lines per package
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            installed.add(fields["Package"])
    return installed


def missing_system_packages(packages: tuple[str, ...], status_file: Path = DPKG_STATUS) -> list[str] | None:
    """The Debian packages among ``packages`` that are not installed; None where dpkg cannot tell."""
    if not packages:
        return []
    installed = installed_debian_packages(status_file)
    if installed is None:
        return None
    names = [p.split("=", 1)[0].split(":", 1)[0] for p in packages]  # apt's pkg=version, pkg:arch
    return [package for package, name in zip(packages, names) if name not in installed]


def cuda_warnings(asked: str) -> list[str]:
    """Why the CUDA runtime here may not be the one ``cuda_version`` asks for (empty when it is)."""
    import torch  # here, not at import: the install script reads configs before torch matters

    built = torch.version.cuda
    if built is None:
        return [f"cuda_version {asked} is asked, but torch {torch.__version__} is a CPU build: "
                "the package runs without CUDA"]
    if Version(built).release[:2] < Version(asked).release[:2]:
        return [f"cuda_version {asked} is asked, but torch {torch.__version__} brings the older CUDA "
                f"runtime {built}"]
    if not torch.cuda.is_available():
        return [f"cuda_version {asked} is asked, but no CUDA device is usable here (no GPU, or a driver "
                f"too old for CUDA {built})"]
    return []


def runtime_problems(directory: str | Path, *, check_cuda: bool = True
                     ) -> tuple[RuntimeConfig | None, list[str], list[tuple[str, str]]]:
    """(config, warnings, unmet python requirements) of the package in ``directory``. ``check_cuda``
    False: where no GPU is expected (an image build), so cuda_version is not compared."""
    config = read_runtime_config(directory)
    if config is None:
        return None, [], []
    build = config.build
    warnings = []
    if config.unknown_keys:
        warnings.append(f"unknown keys, ignored: {', '.join(config.unknown_keys)}")
    unmet, unchecked = unmet_python_requirements(build.python_packages, installed_distributions())
    if unchecked:
        warnings.append(f"python_packages not checked (not a name with a version specifier): "
                        f"{', '.join(unchecked)}")
    missing = missing_system_packages(build.system_packages)
    if missing is None:
        warnings.append(f"system_packages not checked (no dpkg database on this system): "
                        f"{', '.join(build.system_packages)}")
    elif missing:
        warnings.append(f"system packages not installed: {', '.join(missing)} "
                        f"(apt-get install {' '.join(missing)}); the package may fail where it needs them")
    if build.cuda_version is not None and check_cuda:
        warnings += cuda_warnings(build.cuda_version)
    return config, warnings, unmet


def unmet_message(path: Path, unmet: list[tuple[str, str]]) -> str:
    listed = "\n".join(f"  {requirement}: {why}" for requirement, why in unmet)
    return (f"{path} asks for Python packages that are not installed as asked:\n{listed}\n"
            f"Install them, then start again:\n  {pip_install_command([r for r, _ in unmet])}")


def check_runtime(directory: str | Path) -> RuntimeConfig | None:
    """Run at start-up, before the package's code: log each warning, raise CheckpointError listing every
    unmet ``python_packages`` requirement and the command that installs them."""
    path = Path(directory) / RUNTIME_CONFIG_FILE
    config, warnings, unmet = runtime_problems(directory)
    for warning in warnings:
        log.warning("%s: %s", path, warning)
    if unmet:
        raise CheckpointError(unmet_message(path, unmet))
    if config is not None:
        log.info("%s: %d python packages present as asked", path, len(config.build.python_packages))
    return config
