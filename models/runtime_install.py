"""Install what a model package's ``inferless-runtime-config.yaml`` asks for. The Docker build runs this::

    python -m models.runtime_install --constraint requirements.txt models/packages/NAME

in order: ``system_packages`` with apt-get (only those dpkg does not already have), ``python_packages``
with this Python's pip (``--constraint requirements.txt`` keeps Rivulet's own pins: a package that needs
another torch or Flask fails the build, not the server), then each ``run`` command with ``sh -c``. Last
it runs the start-up check (``models.runtime_config``): a build whose packages would still be refused at
start-up fails here. An empty path, or a package without the file, installs nothing.

``--dry-run`` prints the commands without running them (to install by hand on your own machine);
``--check`` only runs the start-up check. Exits non-zero, with the reason on stderr, when a step fails.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

from models.errors import CheckpointError
from models.runtime_config import (
    RUNTIME_CONFIG_FILE, BuildSection, missing_system_packages, read_runtime_config, runtime_problems,
    unmet_message,
)

IMAGE_MODELS_DIR = "models"  # the image copies only this folder of the build context (see the Dockerfile)


def install_steps(build: BuildSection, constraint: str | None) -> list[list[str]]:
    """The commands that install ``build``, in order, each an argv."""
    steps: list[list[str]] = []
    apt = missing_system_packages(build.system_packages)
    apt = list(build.system_packages) if apt is None else apt  # no dpkg database: ask apt for all of them
    if apt:
        steps += [["apt-get", "update"],
                  ["apt-get", "install", "-y", "--no-install-recommends", *apt],
                  ["sh", "-c", "rm -rf /var/lib/apt/lists/*"]]  # the index is not needed at run time
    if build.python_packages:
        pin = ["--constraint", constraint] if constraint else []
        steps.append([sys.executable, "-m", "pip", "install", *pin, *build.python_packages])
    steps += [["sh", "-c", command] for command in build.run]
    return steps


def check_image_path(package: str) -> None:
    """In an image build the package must be inside ``models/``: the only folder the image copies."""
    path = PurePosixPath(package)
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != (IMAGE_MODELS_DIR,):
        raise SystemExit(f"MODEL_PACKAGE={package!r}: give a path under {IMAGE_MODELS_DIR}/ in the build context "
                         f"(e.g. copy the package to {IMAGE_MODELS_DIR}/packages/NAME): the image copies only "
                         f"{IMAGE_MODELS_DIR}/")


def verify(directory: Path, *, image: bool) -> None:
    """The start-up check, now: warnings to stderr, unmet requirements end the build. An image build has
    no GPU to compare cuda_version with: that waits for start-up."""
    _, warnings, unmet = runtime_problems(directory, check_cuda=not image)
    for warning in warnings:
        print(f"warning: {directory / RUNTIME_CONFIG_FILE}: {warning}", file=sys.stderr)
    if unmet:
        raise SystemExit(unmet_message(directory / RUNTIME_CONFIG_FILE, unmet))
    print(f"{directory / RUNTIME_CONFIG_FILE}: every python_packages requirement is met")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.runtime_install", description=__doc__.split("\n\n")[0])
    parser.add_argument("package", help="the package directory (empty: no package, nothing to do)")
    parser.add_argument("--constraint", help="a pip constraints file (the Dockerfile passes requirements.txt)")
    parser.add_argument("--image", action="store_true", help="an image build: the package must be under models/")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode.add_argument("--check", action="store_true", help="only check what is installed, as start-up does")
    args = parser.parse_args(argv)

    if not args.package:
        print("no model package: nothing to install")
        return
    if args.image:
        check_image_path(args.package)
    directory = Path(args.package)
    try:
        config = read_runtime_config(directory)
        if config is None:
            print(f"{directory} has no {RUNTIME_CONFIG_FILE}: nothing to install")
            return
        if args.check:
            verify(directory, image=args.image)
            return
        for step in install_steps(config.build, args.constraint):
            print(f"+ {shlex.join(step)}", flush=True)
            if not args.dry_run:
                result = subprocess.run(step, check=False)
                if result.returncode != 0:
                    raise SystemExit(f"{shlex.join(step)} failed with exit status {result.returncode}")
        if not args.dry_run:
            verify(directory, image=args.image)
    except CheckpointError as exc:
        raise SystemExit(exc.message) from None


if __name__ == "__main__":
    main()
