"""Real services for tests, from Debian's packages: started on free loopback ports, stopped by the tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from serving import free_port

ROOT = Path(__file__).resolve().parents[1]


def need(program: str, package: str) -> str:
    """The path of ``program``; else skip the test (fail it in CI, where .ci/run installs ``package``)."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} is not installed: apt-get install {package} (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """redis-server (Debian's package) with no persistence, on ``port``; ``stop()`` and ``start()``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


def wait_until(check, *, timeout: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            raise RuntimeError(f"{what} did not start" + (f":\n{log.read_text()}" if log and log.exists() else ""))
        time.sleep(0.1)


class HAProxy:
    """haproxy running deploy/haproxy/haproxy.cfg, its Docker-DNS discovery line swapped for ``servers``
    (name -> port on 127.0.0.1) and its ports for free loopback ones."""

    def __init__(self, directory: Path, servers: dict[str, int], *, check_interval: str = "500ms") -> None:
        self.port, self.stats_port = free_port(), free_port()
        config = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
        config = re.sub(r"\nresolvers docker\n(    .*\n)+", "\n", config)
        config = config.replace("bind :11500", f"bind 127.0.0.1:{self.port}")
        config = config.replace("bind :8404", f"bind 127.0.0.1:{self.stats_port}")
        template = re.search(r"^    server-template \S+ \S+ \S+ (.*)$", config, flags=re.MULTILINE)
        options = template.group(1).replace(" resolvers docker", "").replace(" init-addr none", "")
        options = re.sub(r"inter \S+", f"inter {check_interval}", options)
        lines = "\n".join(f"    server {name} 127.0.0.1:{port} {options}" for name, port in servers.items())
        self.config = config.replace(template.group(0), lines)
        self.path = directory / "haproxy.cfg"
        self.path.write_text(self.config)
        self.log = directory / "haproxy.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.path)], stdout=self.log.open("w"),
                                        stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.stats_port}/metrics").status_code == 200,
                   timeout=20, what="haproxy", process=self.process, log=self.log)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Prometheus:
    """prometheus running deploy/prometheus/prometheus.yml, its DNS discovery swapped for static
    ``targets`` and a 1 s scrape interval."""

    def __init__(self, directory: Path, targets: list[str], haproxy_target: str) -> None:
        import yaml

        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
        for job in config["scrape_configs"]:
            if job["job_name"] == "enigma":
                del job["dns_sd_configs"]
                job["static_configs"] = [{"targets": targets}]
            elif job["job_name"] == "haproxy":
                job["static_configs"] = [{"targets": [haproxy_target]}]
        self.path = directory / "prometheus.yml"
        self.path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={self.path}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(f"{self.url}/-/ready").status_code == 200, timeout=30, what="prometheus",
                   process=self.process, log=self.log)

    def query(self, expression: str) -> dict:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}).json()
        return reply

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
