# ddim-serve: one uvicorn worker serving the models of /models (mount model_store/ there, read-only).
#   docker build -t ddim-serve .                                  # CPU build of torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t ddim-serve .  # a CUDA build (any variant the PyTorch
#                                                                 # wheel index offers for this torch version)
#   docker run -p 8000:8000 -v "$PWD/model_store:/models:ro" ddim-serve

FROM python:3.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index, so that the package install below finds it satisfied and never pulls
# the default (CUDA) build from PyPI; its own layer, so that code changes do not download it again.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# the package and its dependencies (pyproject.toml); not editable, as /src stays in this stage
RUN pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DDIM_MODEL_STORE=/models \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    DDIM_LAYOUT_CACHE=/tmp/ddim-serve/layouts.json
RUN groupadd --system --gid 10001 ddim \
    && useradd --system --uid 10001 --gid ddim --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ddim \
    && mkdir /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
USER 10001:10001
EXPOSE 8000
# /readyz answers 503 until every model is loaded and warmed up; urlopen raises on any non-2xx (slim has no curl)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["ddim-serve", "--host", "0.0.0.0", "--port", "8000"]
