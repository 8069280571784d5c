"""observability/: the compose file, Prometheus's config and Grafana's provisioning
fit together (no Docker here: the files are read, not run)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2] / "observability"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_compose_prometheus_and_grafana_fit_together():
    """Catches a mount of a file that is not there, a scrape target or data source URL
    that names no service, and a dashboard mounted where the provider does not look."""
    compose = load(ROOT / "compose.yaml")["services"]
    assert {"tandem", "prometheus", "grafana"} <= set(compose)
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in compose[service]["volumes"]:
            source, target = volume.split(":")[:2]
            assert (ROOT / source).exists(), volume
            mounts[target] = ROOT / source
    assert (ROOT / compose["tandem"]["build"]["context"] / compose["tandem"]["build"]["dockerfile"]).exists()

    prometheus = load(mounts["/etc/prometheus/prometheus.yml"])
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    tandem_port = compose["tandem"]["ports"][0].split(":")[1]
    assert targets == [f"tandem:{tandem_port}"]

    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = load(provisioning / "datasources" / "prometheus.yaml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["prometheus"]["ports"]
    folder = load(provisioning / "dashboards" / "tandem.yaml")["providers"][0]["options"]["path"]
    dashboards = [target for target in mounts if target.startswith(folder + "/")]
    assert [mounts[t].name for t in dashboards] == ["tandem.json"]
    home = compose["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards
