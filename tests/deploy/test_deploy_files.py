"""The deployment files are what their tools accept: hadolint, docker-compose, haproxy, promtool, and a
Grafana dashboard whose every query names metrics enigma exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services import ROOT, need

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "enigma.json"


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = run(str(hadolint), "Dockerfile", "Dockerfile.cuda")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cpu_image_runs_enigma_serve_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") == 2  # multi-stage: the build tools stay behind
    assert "USER 10001" in text and 'ENTRYPOINT ["enigma", "serve"]' in text
    assert 'VOLUME ["/data"]' in text and "HEALTHCHECK" in text and "/health/ready" in text


def test_compose_file_is_valid_with_every_profile():
    need("docker-compose", "docker-compose")
    result = run("docker-compose", "-f", "compose.yaml", "--profile", "monitoring", "--profile", "gpu", "config")
    assert result.returncode == 0, result.stderr
    import yaml

    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"enigma-api", "enigma-api-cuda", "lb", "redis", "prometheus", "grafana"}
    api = services["enigma-api"]
    assert api["environment"]["ENIGMA_PLUGINS__CACHE__REDIS_URL"] == "redis://redis:6379/0"
    assert services["prometheus"]["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]
    assert any("11500" in str(port) for port in services["lb"]["ports"])
    always = {name for name, service in services.items() if not service.get("profiles")}
    assert always == {"enigma-api", "lb", "redis"}  # what a plain `docker compose up` starts


def test_haproxy_config_is_valid():
    need("haproxy", "haproxy")
    result = run("haproxy", "-c", "-f", "deploy/haproxy/haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    assert "balance leastconn" in text and "option httpchk GET /health/ready" in text


def test_prometheus_config_is_valid():
    need("promtool", "prometheus")
    result = run("promtool", "check", "config", "deploy/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def contained(ours, theirs, path="dashboard"):
    """Every key and value of ``ours`` is in ``theirs`` (which may hold more: defaults)."""
    if isinstance(ours, dict):
        assert isinstance(theirs, dict), path
        for key, value in ours.items():
            assert key in theirs, f"{path}.{key} is not part of Grafana's schema"
            contained(value, theirs[key], f"{path}.{key}")
    elif isinstance(ours, list):
        assert isinstance(theirs, list) and len(theirs) == len(ours), path
        for index, (mine, other) in enumerate(zip(ours, theirs)):
            contained(mine, other, f"{path}[{index}]")
    else:
        assert ours == theirs, f"{path}: {ours!r} read back as {theirs!r}"


def test_dashboard_reads_back_through_grafanas_own_models():
    """grafana-foundation-sdk's models are generated from Grafana's schemas: the dashboard, each panel's
    options (the timeseries panel's) and each query (Prometheus') read into them and back unchanged."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.models import dashboard, prometheus

    plugins.register_default_plugins()
    data = json.loads(DASHBOARD.read_text())
    board = dashboard.Dashboard.from_json(data)
    assert all(isinstance(target, prometheus.Dataquery) for panel in board.panels for target in panel.targets)
    again = json.loads(json.dumps(board.to_json(), default=lambda value: value.to_json()))
    contained(data, again)


def test_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource():
    import yaml

    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/enigma.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {"uid", "title", "schemaVersion", "panels", "time"} <= set(dashboard)
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("first token", "inter-token", "tokens per second", "running and waiting", "kv-cache",
                  "cache hit rate"):
        assert topic in titles
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == uid and panel["targets"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"] and target["refId"]
