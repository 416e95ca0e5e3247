# Rivulet in a container: gunicorn with the gevent worker, the shipped demo model inside.
#
#   CPU:  docker build -t rivulet .
#         docker run --rm -p 8080:8080 -e RIVULET_API_KEYS=secret rivulet
#   GPU:  docker build -t rivulet:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#         docker run --rm --gpus all -p 8080:8080 -e RIVULET_DEVICE=cuda rivulet:cuda
#         (torch's CUDA wheels bring their own CUDA runtime; the host needs only an NVIDIA driver recent
#         enough for that CUDA version (cu128 = CUDA 12.8) and the NVIDIA container toolkit, so the slim
#         base serves both variants)
#   Own model: mount it and point RIVULET_MODEL at it, e.g.
#         docker run -v /srv/llama:/models/llama:ro -e RIVULET_MODEL=/models/llama ... rivulet
#   Model package with its runtime (inferless-runtime-config.yaml): put it under models/ and name it, e.g.
#         docker build -t rivulet:life --build-arg MODEL_PACKAGE=models/packages/life .
# Every setting is an environment variable (RIVULET_*, see README); nothing is baked in but the defaults.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The native CPU kernels (models/native_kernels.c), built ahead of time for each x86-64 level: the image
# has no C compiler to build them at start-up, and the server picks the best level the CPU runs. A stage
# of its own, so the compiler stays out of the image.
FROM ${PYTHON_IMAGE} AS kernels
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY models/__init__.py models/native_build.py models/native_kernels.c models/subprocesses.py models/
RUN python -m models.native_build --prebuild /build/native_prebuilt

FROM ${PYTHON_IMAGE}

# Which torch build pip picks for requirements.txt's torch pin: CPU wheels by default (a plain PyPI torch
# pulls gigabytes of CUDA libraries); a CUDA index for the GPU variant.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The server runs as an unprivileged user (numeric, so any host resolves it); the code and model stay
# root-owned and read-only to it.
RUN groupadd --gid 10001 rivulet \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 rivulet

WORKDIR /app

# Dependencies first, in their own layer: code changes do not reinstall torch.
COPY requirements.txt ./
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt

# A model package's own runtime, from its inferless-runtime-config.yaml: apt packages, pip packages (held
# to requirements.txt's pins), run commands. Its own cached layer, keyed on that file and the installer's
# few modules (tests/test_runtime_install.py keeps their list whole): editing the package's code does not
# reinstall them. MODEL_PACKAGE: the package's path under models/ (empty: none).
ARG MODEL_PACKAGE=
COPY models/__init__.py models/api.py models/errors.py models/runtime_config.py models/runtime_install.py models/
# The [l] makes the file optional: a package without one (or no package) copies nothing.
COPY ${MODEL_PACKAGE}/inferless-runtime-config.yam[l] ./${MODEL_PACKAGE}/
RUN PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" \
    python -m models.runtime_install --image --constraint requirements.txt "${MODEL_PACKAGE}"

COPY gunicorn.conf.py wsgi.py ./
COPY service/ service/
COPY models/ models/
COPY --from=kernels /build/native_prebuilt/ models/native_prebuilt/

# The package, when one was built in, is what the image serves (RIVULET_MODEL still overrides it).
ENV RIVULET_MODEL=${MODEL_PACKAGE:-models/demo}

USER 10001:10001

EXPOSE 8080

# /ready is 200 once the model is loaded and the engine thread alive (503 before, and after a failure).
# The slim image has no curl: Python's urllib raises on a non-2xx answer, which exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ready', timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
