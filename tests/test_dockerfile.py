"""The Dockerfile, checked without a Docker engine (none runs on these machines): hadolint's rules, and
that the image would run the README's command on the port the service listens on, with every file the
service needs and nothing the build context leaves out."""
from __future__ import annotations

import fnmatch
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
README_COMMAND = "gunicorn -c gunicorn.conf.py wsgi:app"


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def first(instructions, cmd: str) -> dockerfile.Command:
    found = [i for i in instructions if i.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd}, found {len(found)}"
    return found[0]


def final_stage(instructions) -> list[dockerfile.Command]:
    """The instructions of the image itself: those after the last FROM (earlier stages only build)."""
    last_from = max(i for i, ins in enumerate(instructions) if ins.cmd == "FROM")
    return instructions[last_from:]


def copy_sources(instructions) -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context, destinations relative to /app."""
    pairs = []
    for ins in instructions:
        if ins.cmd == "COPY" and not any(f.startswith("--from") for f in ins.flags):
            *sources, dest = ins.value
            pairs += [(src.rstrip("/"), dest) for src in sources]
    return pairs


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern is matched against the path relative to the context and against each of
    its parent folders (excluding a folder excludes what is inside); ``**`` matches any number of
    folders; a later ``!pattern`` re-includes."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.compile(fnmatch.translate(pattern).replace(".*/", "(.*/)?"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def repo_files() -> list[str]:
    """The files a fresh clone has (tracked, plus new ones not yet committed but not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def in_image(path: str, copies: list[tuple[str, str]], patterns: list[str]) -> bool:
    if dockerignore_excludes(path, patterns):
        return False
    return any(path == src or path.startswith(src + "/") for src, _ in copies)


def test_hadolint_passes():
    result = subprocess.run([HADOLINT, "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cmd_is_the_readme_command_in_exec_form(instructions):
    cmd = first(instructions, "CMD")
    assert cmd.json, "exec form, so gunicorn is PID 1 and gets SIGTERM for its graceful drain"
    assert " ".join(cmd.value) == README_COMMAND
    readme = (ROOT / "README.md").read_text()
    assert README_COMMAND in readme


def test_exposes_the_port_gunicorn_binds_by_default(instructions):
    assert first(instructions, "EXPOSE").value == ("8080",)
    conf = (ROOT / "gunicorn.conf.py").read_text()
    assert re.search(r"""^bind\s*=.*0\.0\.0\.0:8080""", conf, re.MULTILINE), "gunicorn.conf.py binds 0.0.0.0:8080"


def test_healthcheck_asks_ready_without_curl(instructions):
    check = " ".join(first(instructions, "HEALTHCHECK").value)
    assert "/ready" in check and "urllib" in check and "curl" not in check


def test_runs_as_a_numeric_non_root_user(instructions):
    user = first(instructions, "USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    order = [i.cmd for i in instructions]
    assert order.index("USER") < order.index("CMD")


def test_dependencies_install_before_the_code_is_copied(instructions):
    copies = [i for i in final_stage(instructions) if i.cmd == "COPY"]
    assert copies[0].value[:-1] == ("requirements.txt",), "requirements.txt alone first: a cached layer"
    install = next(i for i in instructions if i.cmd == "RUN" and "-r requirements.txt" in i.value[0])
    assert copies[0].start_line < install.start_line < copies[1].start_line


def test_base_image_is_slim_python(instructions):
    args = {a.value[0].split("=", 1)[0]: a.value[0].split("=", 1)[1]
            for a in instructions if a.cmd == "ARG" and "=" in a.value[0]}
    for stage in (i for i in instructions if i.cmd == "FROM"):
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], stage.value[0])
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base


def test_the_native_kernels_are_built_in_a_stage_of_their_own_and_copied_in(instructions):
    """The image has no C compiler: models/native_build.py builds the kernels for every x86-64 level in an
    earlier stage, whose compiler stays out of the image, and the image holds them where it looks."""
    from models import native_build

    stages = [i for i, ins in enumerate(instructions) if ins.cmd == "FROM"]
    assert len(stages) == 2 and instructions[stages[0]].value[-1] == "kernels"
    kernels = instructions[stages[0]:stages[1]]
    build = next(i for i in kernels if i.cmd == "RUN" and "models.native_build --prebuild" in i.value[0])
    copied = {src for i in kernels if i.cmd == "COPY" for src in i.value[:-1]}
    # Everything the build imports or reads, and nothing that needs torch.
    assert copied == {"models/__init__.py", "models/native_build.py", "models/native_kernels.c",
                      "models/subprocesses.py"}
    out_dir = build.value[0].split("--prebuild")[1].split()[0]
    copy_in = next(i for i in final_stage(instructions) if i.cmd == "COPY" and "--from=kernels" in i.flags)
    assert copy_in.value[0].rstrip("/") == out_dir
    assert copy_in.value[1].rstrip("/") == str(native_build.PREBUILT.relative_to(ROOT))
    assert not any("gcc" in i.value[0] for i in final_stage(instructions) if i.cmd == "RUN")


def test_every_copied_source_exists_and_is_in_the_build_context(instructions, ignore_patterns):
    for src, _ in copy_sources(instructions):
        if "${" in src:  # a path named by a build argument (a model package's config): test_runtime_install.py
            continue
        assert (ROOT / src).exists(), f"COPY {src}: not in the repo"
        assert not dockerignore_excludes(src, ignore_patterns), f"COPY {src}: excluded by .dockerignore"


def test_the_image_holds_the_service_code_and_the_demo_model(instructions, ignore_patterns):
    copies = copy_sources(instructions)
    files = repo_files()
    needed = [f for f in files
              if (f.endswith(".py") and not f.startswith(("tests/", "bench/", ".ci/")))
              or f.startswith(("models/demo/", "service/static/"))]
    assert "models/demo/model.safetensors" in needed
    assert "wsgi.py" in needed
    missing = [f for f in needed if not in_image(f, copies, ignore_patterns)]
    assert missing == []
    # COPY keeps file modes and the server runs as a non-root user: what it loads must be world-readable.
    unreadable = [f for f in needed if not (ROOT / f).stat().st_mode & stat.S_IROTH]
    assert unreadable == [], "the image's user could not read these"


def test_tests_and_local_state_stay_out_of_the_image(instructions, ignore_patterns):
    copies = copy_sources(instructions)
    for path in ("tests/live_server.py", ".venv/bin/python", ".git/HEAD", "service/__pycache__/x.pyc",
                 "models/__pycache__/llama.cpython-311.pyc"):
        assert not in_image(path, copies, ignore_patterns), path


def test_gpu_variant_is_a_build_argument(instructions):
    args = [a.value[0] for a in instructions if a.cmd == "ARG"]
    assert any(a.startswith("TORCH_INDEX_URL=") and a.endswith("/cpu") for a in args)
    install = next(i for i in instructions if i.cmd == "RUN" and "-r requirements.txt" in i.value[0])
    assert "TORCH_INDEX_URL" in install.value[0]
