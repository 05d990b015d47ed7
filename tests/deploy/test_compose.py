"""The compose stack in real containers: tools/docker-check builds the CPU image and checks that it
serves, then `docker compose up --scale enigma-api=3` runs it behind the load balancer with Redis and
Prometheus. Slow (minutes: a base image, torch in the image); it needs a Docker engine, which the test
starts when it may. Where Docker Hub is out of reach, the base and the service images are made from
Debian's packages (compose.offline.yaml swaps the images, nothing else)."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services import ROOT, need, wait_until
from test_topology import many_streams, served_by

pytestmark = pytest.mark.slow
PROJECT = "enigmatest"


def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = ["docker-compose", "-p", PROJECT, "-f", "compose.yaml", "-f", "tests/deploy/compose.offline.yaml",
               *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def engine_runs() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def built():
    """What tools/docker-check printed: the base image, the size, health. A Docker engine the script
    started is stopped afterwards."""
    need("docker", "docker.io")
    need("dockerd", "docker.io")
    need("docker-compose", "docker-compose")
    need("debootstrap", "debootstrap")
    ours = not engine_runs()
    try:
        result = subprocess.run([str(ROOT / "tools" / "docker-check")], cwd=ROOT, capture_output=True, text=True,
                                timeout=1800, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        print(result.stdout)
        yield result.stdout
    finally:
        pid = Path("/var/run/docker.pid")
        if ours and pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], check=False)


def test_the_image_builds_runs_healthy_as_non_root_and_serves(built):
    assert re.search(r"image size: \d+ MB", built)
    assert "health: healthy (user 10001)" in built
    assert '"object":"chat.completion"' in built and "all-minilm-l6-v2 embeds in 384 dimensions" in built


@pytest.fixture(scope="module")
def stack(built):
    for port in (11500, 9090):
        if not port_is_free(port):
            pytest.fail(f"port {port} is taken; compose.yaml publishes it")
    base = re.search(r"built \S+ on (\S+) in", built).group(1)
    subprocess.run(["docker", "build", "-q", "-t", "enigma-services:bookworm", "--build-arg", f"BASE={base}",
                    "-f", "tests/deploy/services.Dockerfile", "tests/deploy"], cwd=ROOT, check=True,
                   capture_output=True, timeout=900)
    compose("down", "-v", check=False)
    try:
        compose("up", "-d", "--no-build", "--scale", "enigma-api=3", "enigma-api", "lb", "redis", "prometheus")

        def healthy() -> bool:
            ids = compose("ps", "-q", "enigma-api").stdout.split()
            states = [subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid],
                                     capture_output=True, text=True).stdout.strip() for cid in ids]
            return len(states) == 3 and all(state == "healthy" for state in states)

        wait_until(healthy, timeout=240, what="three healthy enigma-api replicas")
        seen: set[str] = set()

        def balancer_knows_all_three() -> bool:
            # Docker calls a replica healthy before haproxy's DNS discovery and its own health checks
            # (every 2 s) put it in rotation; with nothing open, leastconn rounds the ones it has
            reply = httpx.get("http://127.0.0.1:11500/health/ready")
            if reply.status_code == 200:
                seen.add(reply.headers["x-enigma-replica"])
            return len(seen) == 3

        wait_until(balancer_knows_all_three, timeout=90, what="the load balancer with three replicas")
        yield "http://127.0.0.1:11500"
    finally:
        logs = compose("logs", "--no-color", "--tail", "30", check=False).stdout
        compose("down", "-v", check=False)
        print(logs)


def test_the_load_balancer_spreads_streams_over_the_replicas(stack):
    results = asyncio.run(many_streams(stack, 24))
    assert all(result["finish"] for result in results), results[:3]
    shares = served_by(results)
    assert len(shares) == 3 and max(shares.values()) <= 12, shares


def test_replicas_share_the_cache_through_redis(stack):
    body = {"model": "enigma-tiny", "messages": [{"role": "user", "content": "Compose cache check"}],
            "max_tokens": 10, "temperature": 0}
    replies = [httpx.post(f"{stack}/v1/chat/completions", json=body, timeout=60) for _ in range(3)]
    assert [reply.headers["x-enigma-cache"] for reply in replies] == ["miss", "hit", "hit"]
    replicas = [reply.headers["x-enigma-replica"] for reply in replies]
    assert len(set(replicas)) == 3  # leastconn with nothing open: round the replicas
    assert [reply.headers["x-enigma-cache-level"] for reply in replies[1:]] == ["redis", "redis"]


def test_prometheus_finds_every_replica_by_dns(stack):
    def three_up() -> bool:
        reply = httpx.get("http://127.0.0.1:9090/api/v1/query", params={"query": 'up{job="enigma"} == 1'}).json()
        return len(reply["data"]["result"]) == 3

    wait_until(three_up, timeout=60, what="Prometheus scraping three replicas")


def test_a_killed_replica_is_taken_out(stack):
    victim = compose("ps", "-q", "enigma-api").stdout.split()[0]
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    time.sleep(1)
    results = asyncio.run(many_streams(stack, 12, attempts=2))
    assert all(result["finish"] for result in results), results
    assert len(served_by(results)) == 2
