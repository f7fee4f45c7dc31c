# The example training job of deploy/docker-compose.yml and deploy/kubernetes/: torch (CPU) and
# the lrpilot client, running deploy/example-train.py. Build from the repository root:
#
#   docker build -f deploy/train.Dockerfile -t lrpilot-example-train .
#
# TORCH_INDEX_URL picks where torch comes from: PyTorch's CPU index by default (a plain
# `pip install torch` from PyPI brings the CUDA build, gigabytes of libraries a CPU job never uses).
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY clients/ /tmp/clients/
RUN pip install --no-cache-dir /tmp/clients && rm -rf /tmp/clients
COPY deploy/example-train.py /app/train.py

RUN groupadd --system --gid 10001 trainer \
    && useradd --system --uid 10001 --gid trainer --no-create-home --shell /usr/sbin/nologin trainer
USER trainer:trainer
WORKDIR /app
# exec form: python is PID 1 and gets SIGTERM directly
ENTRYPOINT ["python", "/app/train.py"]
