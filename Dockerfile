# msa-serve on CUDA: the image the Helm chart's Ray pods run (`make image`).
# The weights are not in the image: the chart mounts them at /models.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/msa-serve \
    PATH=/opt/msa-serve/bin:$PATH

# redis-server is for `msa-serve up` inside the container; on Kubernetes the chart runs Redis.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv redis-server tini \
    && rm -rf /var/lib/apt/lists/*

# KubeRay starts Ray in the container as this user (uid 1000, home /home/ray).
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
    && python3 -m venv /opt/msa-serve \
    && chown -R ray:ray /opt/msa-serve

WORKDIR /home/ray/msa-serve
COPY --chown=ray:ray pyproject.toml README.md ./
COPY --chown=ray:ray kernels ./kernels
COPY --chown=ray:ray worker ./worker
COPY --chown=ray:ray preprocess ./preprocess
COPY --chown=ray:ray deployments ./deployments

USER 1000
RUN pip install --no-cache-dir . \
    && python -c "import deployments.app, kernels, worker"

EXPOSE 8000 9000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["msa-serve", "up", "--host", "0.0.0.0"]
