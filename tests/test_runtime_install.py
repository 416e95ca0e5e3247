"""models/runtime_install.py, the script the Dockerfile runs to build a package's runtime into the image.

No Docker engine runs here, so the test runs that same script the way the build does, in a throwaway
virtualenv: offline (pip sees only a wheel the test makes, nothing is downloaded), with this Python's
packages visible to it (torch is not installed again: it is already there, as in the image).
"""
from __future__ import annotations

import ast
import base64
import hashlib
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import dockerfile
import pytest

from models.runtime_config import RUNTIME_CONFIG_FILE
from models.runtime_install import verify

ROOT = Path(__file__).resolve().parent.parent
LIFE = ROOT / "models" / "packages" / "life"
TINY = "rivulet-tiny-wheel"  # the package the test's config asks for, as a wheel the test writes


def write_wheel(folder: Path, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel: one module and its dist-info (with a RECORD pip accepts)."""
    files = {"rivulet_tiny_wheel/__init__.py": f"VERSION = {version!r}\n",
             f"rivulet_tiny_wheel-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {TINY}\nVersion: {version}\n",
             f"rivulet_tiny_wheel-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: rivulet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = f"rivulet_tiny_wheel-{version}.dist-info/RECORD"
    lines = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(text.encode())}")
    files[record] = "\n".join([*lines, f"{record},,"]) + "\n"
    path = folder / f"rivulet_tiny_wheel-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(python, environment) of a new virtualenv that also sees this Python's packages, with pip offline."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    python = root / "env" / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(subprocess.run([str(python), "-c", purelib],
                                        check=True, capture_output=True, text=True).stdout.strip())
    # Below its own site-packages (what pip installs there wins): this Python's, pip and torch included.
    (site_packages / "zz_outer_packages.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    wheels = root / "wheels"
    wheels.mkdir()
    write_wheel(wheels)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
            "PATH": f"{python.parent}{os.pathsep}{env.get('PATH', '')}"}
    return python, env


def run_script(venv, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    python, env = venv
    env = env | {"PYTHONPATH": str(ROOT)}  # the image runs it from /app, where models/ is
    return subprocess.run([str(python), "-m", "models.runtime_install", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def package_with(tmp_path: Path, config: str) -> Path:
    (tmp_path / RUNTIME_CONFIG_FILE).write_text(config, encoding="utf-8")
    return tmp_path


def test_the_install_step_installs_what_the_config_asks_then_passes_the_start_up_check(venv, tmp_path):
    package = package_with(tmp_path, f"""build:
  system_packages: []
  python_packages: ["{TINY}==1.0", "torch==2.13.0"]
  run:
    - python -c "import rivulet_tiny_wheel as m, pathlib; pathlib.Path('run-output').write_text(m.VERSION)"
""")
    before = run_script(venv, "--check", str(package))
    assert before.returncode == 1
    assert f"{TINY}==1.0: not installed" in before.stderr and "-m pip install" in before.stderr

    constraint = str(ROOT / "requirements.txt")
    result = run_script(venv, "--constraint", constraint, str(package), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--constraint {constraint} rivulet-tiny-wheel==1.0 torch==2.13.0" in result.stdout
    assert "every python_packages requirement is met" in result.stdout
    assert (tmp_path / "run-output").read_text() == "1.0"  # the run command ran in the working dir, after pip
    assert run_script(venv, "--check", str(package)).returncode == 0


def test_the_life_example_builds_with_nothing_to_download(venv):
    result = run_script(venv, "--image", "--constraint", "requirements.txt", "models/packages/life")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "install --constraint requirements.txt torch==2.13.0" in result.stdout


def test_a_build_that_cannot_meet_the_config_fails(venv, tmp_path):
    package = package_with(tmp_path, 'build:\n  python_packages: ["rivulet-tiny-wheel==2.0"]\n')
    result = run_script(venv, str(package))
    assert result.returncode != 0
    assert "rivulet-tiny-wheel==2.0" in result.stderr and "failed with exit status" in result.stderr


def test_a_dry_run_prints_apt_pip_and_run_steps_and_runs_nothing(venv, tmp_path):
    package = package_with(tmp_path, """build:
  system_packages: ["dpkg", "rivulet-no-such-debian-package"]
  python_packages: ["rivulet-no-such-python-package"]
  run: ["touch should-not-exist"]
""")
    result = run_script(venv, "--dry-run", str(package), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert steps[0] == "apt-get update"
    if Path("/var/lib/dpkg/status").is_file():  # what dpkg already has is not asked of apt again
        assert steps[1] == "apt-get install -y --no-install-recommends rivulet-no-such-debian-package"
    assert steps[-2].endswith("-m pip install rivulet-no-such-python-package")
    assert steps[-1] == "sh -c 'touch should-not-exist'"
    assert not (tmp_path / "should-not-exist").exists()


def test_an_image_build_leaves_the_cuda_check_to_start_up(tmp_path, capsys):
    package = package_with(tmp_path, 'build:\n  cuda_version: "99.0"\n')
    verify(package, image=False)
    assert "cuda_version 99.0 is asked" in capsys.readouterr().err
    verify(package, image=True)
    assert "cuda_version" not in capsys.readouterr().err  # no GPU while an image builds


@pytest.mark.parametrize("package", ["/srv/pkg", "packages/x", "models/../x"])
def test_an_image_build_refuses_a_package_outside_models(venv, package):
    result = run_script(venv, "--image", package)
    assert result.returncode != 0 and "give a path under models/" in result.stderr


def test_no_package_or_no_config_installs_nothing(venv):
    assert "nothing to install" in run_script(venv, "--image", "").stdout
    assert "nothing to install" in run_script(venv, "--image", "models/packages/words").stdout


# --- the Dockerfile runs exactly this -----------------------------------------------------------------


def test_the_dockerfile_runs_the_script_in_its_own_layer_before_the_code():
    instructions = list(dockerfile.parse_file(str(ROOT / "Dockerfile")))
    runs = [i for i in instructions if i.cmd == "RUN" and "models.runtime_install" in i.value[0]]
    assert len(runs) == 1
    command = runs[0].value[0]
    assert '--image --constraint requirements.txt "${MODEL_PACKAGE}"' in command
    requirements = next(i for i in instructions if i.cmd == "RUN" and "-r requirements.txt" in i.value[0])
    code = next(i for i in instructions if i.cmd == "COPY" and i.value[0] == "service/")
    assert requirements.start_line < runs[0].start_line < code.start_line
    # What the layer copies first: the package's config alone, and every module the script imports.
    early = [i for i in instructions
             if i.cmd == "COPY" and requirements.start_line < i.start_line < runs[0].start_line]
    copied = {src for i in early for src in i.value[:-1]}
    assert "${MODEL_PACKAGE}/inferless-runtime-config.yam[l]" in copied
    assert models_imported_by("models/runtime_install.py") <= copied


def models_imported_by(path: str, seen: set[str] | None = None) -> set[str]:
    """``path`` and every models/ module it imports, transitively, plus models/__init__.py."""
    seen = seen if seen is not None else {"models/__init__.py"}
    seen.add(path)
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("models."):
            module = node.module.replace(".", "/") + ".py"
            if module not in seen:
                models_imported_by(module, seen)
    return seen
