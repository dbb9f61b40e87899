# syntax=docker/dockerfile:1
# mixinfer images, two targets:
#   gpu (default, the last stage): NVIDIA CUDA + cuDNN runtime, `.[serve,gpu]` (onnxruntime-gpu), no torch.
#   cpu:                           slim Python,                `.[serve,cpu]` (onnxruntime),     no torch.
#   docker build -t mixinfer:gpu .            docker build --target cpu -t mixinfer:cpu .
#
# Why this CUDA base: onnxruntime-gpu 1.31.x on PyPI is built against CUDA 13.0 and cuDNN 9 (the wheel's
# onnxruntime/capi/build_and_package_info.py says cuda_version = '13.0', its `cudnn` extra needs
# nvidia-cudnn-cu13~=9.0, and libonnxruntime_providers_cuda.so links libcudart.so.13 and libcublas.so.13).
# CUDA minor-version compatibility lets any 13.x runtime serve it; cuDNN 8 or 10 would not. The host needs an
# NVIDIA driver new enough for CUDA 13 (>= 580) and a GPU of compute capability >= 7.5 (CUDA 13 dropped Maxwell,
# Pascal and Volta: no V100, P100, P4); older cards run the cpu target (docs/deploy.md).
# tests/deploy/test_deploy_dockerfile.py pins this pairing to pyproject.toml.
#
# Layers: each runtime stage installs its dependencies from a locked, hashed file (deploy/requirements/*.txt, written
# by `make lock`) before anything of the app is copied, so an edit of the code or README rebuilds only the app layer.

# ---- wheel: build the package once, as a wheel; nothing else is installed in this stage ----------------------
FROM python:3.12.11-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---- cpu: hosts without a GPU ----------------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent mixinfer
# Dependencies: `.[serve,cpu]` as locked, every file checked against its hash; wheels only.
COPY deploy/requirements/cpu.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# The app: the wheel alone (its dependencies are all above); the check refuses torch and a second ONNX Runtime.
COPY deploy/check_image_env.py deploy/healthcheck.py /opt/mixinfer/
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-deps /tmp/wheels/mixinfer-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python /opt/mixinfer/check_image_env.py onnxruntime \
    && rm -rf /tmp/wheels
# The default bundle (the model_store/ files git tracks: .dockerignore) is baked in; compose mounts ./model_store
# over it read-only.
COPY model_store /models
ENV PATH=/opt/venv/bin:$PATH \
    MIXINFER_HOST=0.0.0.0 \
    MIXINFER_PORT=8000 \
    MIXINFER_GRPC_PORT=8001 \
    MIXINFER_METRICS_PORT=8002 \
    MIXINFER_MODEL_DIR=/models \
    MIXINFER_PROVIDERS=CPUExecutionProvider
USER mixinfer
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/mixinfer/healthcheck.py"]
ENTRYPOINT ["mixinfer"]
CMD ["serve"]

# ---- gpu: one server process per container, one GPU per container ----------------------------------------------
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent mixinfer
# Dependencies: `.[serve,gpu]` as locked, every file checked against its hash; wheels only.
COPY deploy/requirements/gpu.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# The app: the wheel alone (its dependencies are all above); the check refuses torch and a second ONNX Runtime.
COPY deploy/check_image_env.py deploy/healthcheck.py /opt/mixinfer/
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-deps /tmp/wheels/mixinfer-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python /opt/mixinfer/check_image_env.py onnxruntime-gpu \
    && rm -rf /tmp/wheels
COPY model_store /models
# The device comes from the reservation in docker-compose.yml (`--gpus`); the base image already sets the
# NVIDIA_* variables the container toolkit reads (driver capabilities compute,utility).
ENV PATH=/opt/venv/bin:$PATH \
    MIXINFER_HOST=0.0.0.0 \
    MIXINFER_PORT=8000 \
    MIXINFER_GRPC_PORT=8001 \
    MIXINFER_METRICS_PORT=8002 \
    MIXINFER_MODEL_DIR=/models \
    MIXINFER_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
USER mixinfer
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/mixinfer/healthcheck.py"]
# One uvicorn process owns the one GPU this container reserves; scale out with one container per GPU.
ENTRYPOINT ["mixinfer"]
CMD ["serve"]
