# syntax=docker/dockerfile:1
# GPT-2 inference service image. CPU by default; `--build-arg VARIANT=cuda` installs PyPI's CUDA build of
# torch instead (it carries its CUDA libraries; run with the NVIDIA container toolkit and DEVICE=cuda).
#
#   docker build -t gpt2-serve .                                     # CPU; torch from docker/wheels or the CPU index
#   docker build --build-arg VARIANT=cuda -t gpt2-serve:cuda .       # CUDA
#   docker run --rm -p 127.0.0.1:8000:8000 -v models:/models gpt2-serve
#
# The bundled default model is in the image at /models, the store root, which is a volume: a new named
# volume starts with the bundled model, and versions fine-tuned into it (`python -m model_store finetune`,
# same image) persist. The service drains for DRAIN_TIMEOUT seconds after SIGTERM: give `docker stop -t`
# (compose: stop_grace_period, k8s: terminationGracePeriodSeconds) more than that.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
# A directory inside the build context with a torch wheel (offline builds); empty directory: use an index.
ARG TORCH_WHEELS=docker/wheels
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# pip in the image's venv (the base image's own can be old, with known advisories); `make install` reads it too.
ARG PIP_VERSION=26.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "pip==$PIP_VERSION"
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY ${TORCH_WHEELS}/ /wheels/
# torch first, pinned to the same version as pyproject.toml, so that resolving the project finds it installed
# (its own dependencies come from the index).
COPY pyproject.toml README.md ./
RUN version="$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)" \
 && test -n "$version" \
 && if ls /wheels/torch-*.whl > /dev/null 2>&1; then \
        pip install /wheels/torch-"$version"*.whl; \
    elif [ "$VARIANT" = cuda ]; then \
        pip install "torch==$version"; \
    else \
        pip install --index-url "$TORCH_CPU_INDEX" "torch==$version"; \
    fi
COPY service/ service/
COPY model_store/ model_store/
# The service plus the fine-tuning extras (peft, matplotlib), so the same image runs the store CLI.
# DL3013: the project itself is installed; pyproject.toml pins every dependency exactly.
# hadolint ignore=DL3013
RUN pip install '.[train]' && python -c "import service, model_store, torch; print('torch', torch.__version__)"

FROM ${BASE_IMAGE} AS runtime
# The base image's own pip, setuptools and wheel serve nothing here (the service runs from /opt/venv, which
# has its own pip) and can carry known advisories: removed.
RUN if python -m pip --version > /dev/null 2>&1; then python -m pip uninstall --yes --quiet pip setuptools wheel; fi \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --chown=10001:10001 models/README.md /models/README.md
COPY --chown=10001:10001 models/default/ /models/default/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_STORE_ROOT=/models \
    MODEL=default@prod \
    HOST=0.0.0.0 \
    PORT=8000 \
    DRAIN_TIMEOUT=30
USER 10001:10001
WORKDIR /home/app
VOLUME ["/models"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# Ready (model loaded and warmed up, not draining), on whatever PORT is set; python because slim has no curl.
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "service"]
