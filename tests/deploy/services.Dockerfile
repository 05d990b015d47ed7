# redis-server, haproxy and prometheus from Debian's packages: what tests/deploy/compose.offline.yaml runs
# in place of Docker Hub's redis, haproxy and prom/prometheus images where the Hub is out of reach.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server haproxy prometheus \
    && rm -rf /var/lib/apt/lists/*
