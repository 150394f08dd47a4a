# diffbatch image: API, worker, beat, migrations and Flower all run from it (see compose.yaml).
#
# torch comes first, from its own index, so `pip install .` finds it satisfied and never pulls a
# multi-GB build of its choosing. The default is the CPU build. For GPU workers build with CUDA:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t diffbatch .
# (pick the cuXXX index matching the host driver; TORCH_VERSION selects another torch release).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --create-home --uid 1000 diffbatch \
    && mkdir -p /data \
    && chown diffbatch:diffbatch /data

# A named volume mounted at /data starts with this folder's owner, so the unprivileged user can write.
USER diffbatch
ENV DIFFBATCH_DATA_DIR=/data
EXPOSE 8000
CMD ["diffbatch", "api", "--host", "0.0.0.0"]
