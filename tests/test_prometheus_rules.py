"""The Prometheus rules shipped in deploy/prometheus/ (issue 24 item 3): promtool accepts them
and their unit tests pass, every metric and label they name is one pacs-ai exports, and on what
a running pacs-ai really exports the drift alert fires."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from pacs_ai.config import load_config
from pacs_ai.ops import metrics
from pacs_ai.service import Service
from testbed.dicom_peers import (SimulatedModality, synthetic_radiograph, wait_until,
                                 write_service_config)
from testbed.environment import REPO_ROOT, skip_or_fail
from testbed.tiny_models import export_untrained_tiny_ensemble
from tests.test_health import get

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "pacs-ai.rules.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
SCRAPE_LABELS = {"instance", "job"}  # what Prometheus adds to each scraped series


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool not installed (apt-get install prometheus)")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.real_peer
def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.real_peer
def test_the_rules_unit_tests_pass():
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def exported_series() -> dict[str, set[str]]:
    """Each series name pacs-ai's /metrics can give, with its label names (from the metric
    objects themselves: labelled series appear in a scrape only once used)."""
    series: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, (Counter, Gauge, Histogram)):
            continue
        name, labels = metric._name, set(metric._labelnames)  # prometheus-client's own fields
        if isinstance(metric, Counter):
            series[f"{name}_total"] = labels
        elif isinstance(metric, Histogram):
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels,
                           f"{name}_count": labels})
        else:
            series[name] = labels
    return series


SELECTOR = re.compile(r"\b(pacs_ai_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def test_every_metric_and_label_the_rules_name_is_exported():
    """A renamed metric or label would leave an alert silently never firing."""
    exported = exported_series()
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    model_labels = exported["pacs_ai_model_results_total"]
    for rule in rules:
        expr = rule["expr"]
        for name, matchers in SELECTOR.findall(expr):
            assert name in exported, f"{rule.get('alert') or rule.get('record')}: {name}"
            used = set(re.findall(r"([a-z_]+)\s*[=!]~?", matchers))
            assert used <= exported[name] | SCRAPE_LABELS, (name, used)
        for labels in GROUPING.findall(expr):  # by (name, version, role) and the like
            names = {label.strip() for label in labels.split(",") if label.strip()}
            assert names <= model_labels | {"destination", "stage"} | SCRAPE_LABELS, names
        for name in re.findall(r"\bpacs_ai:[a-z0-9_:]+", expr):
            assert name in recorded, name
    for test_file in RULE_TESTS:  # the unit tests feed series as pacs-ai exports them
        for test in yaml.safe_load(test_file.read_text())["tests"]:
            for item in test["input_series"]:
                name, matchers = SELECTOR.match(item["series"]).groups()
                assert name in exported, (test_file.name, name)
                used = set(re.findall(r"([a-z_]+)=", matchers or ""))
                assert used == exported[name] | SCRAPE_LABELS, (name, used)


@pytest.mark.real_peer
def test_the_positive_rate_alert_fires_on_what_a_running_service_exports(tmp_path):
    """A service whose threshold makes every film pneumonia, at a site expecting 10-30 %:
    its /metrics before and after six films, fed to promtool as an hour of scrapes, fire
    PacsAiPositiveRateOutsideBand for that model, and no other drift or arrival alert."""
    model = export_untrained_tiny_ensemble(tmp_path / "ens.pt", ood_threshold=1e9,
                                           threshold=0.0)
    config = write_service_config(tmp_path, model=model, tables={
        "metrics": {"enabled": True, "port": 0},
        "drift": {"expected_positive_rate": [0.1, 0.3], "min_films": 5}})
    service = Service(load_config(config)).start()
    try:
        before = get(service, "/metrics")[1]
        results = SimulatedModality(service.port).send(
            [synthetic_radiograph(seed=seed) for seed in range(6)])
        assert all(result.acknowledged for result in results)
        assert wait_until(lambda: service.store.job_counts()["done"] == 6, 60)
        after = get(service, "/metrics")[1]
        info = service.model.info
    finally:
        service.stop()

    def values(text: str) -> dict[str, tuple[str, float]]:
        series = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {**sample.labels, "instance": "pacs-ai:9108", "job": "pacs-ai"}
                selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                series[f"{sample.name}{{{selector}}}"] = (family.type, sample.value)
        return series

    first, last = values(before), values(after)
    input_series = []
    for key, (kind, value) in last.items():
        start_value = first.get(key, (kind, 0.0))[1] if kind != "gauge" else value
        # 5 scrapes before the films, then 115 after: two hours at one a minute
        input_series.append({"series": key, "values": f"{start_value!r}x5 {value!r}x115"})
    rule = next(rule for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if rule.get("alert") == "PacsAiPositiveRateOutsideBand")
    summary = (rule["annotations"]["summary"]
               .replace("{{ $labels.name }}", info.name)
               .replace("{{ $labels.version }}", info.version)
               .replace("{{ $value | humanizePercentage }}", "100%"))
    test = {
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": [
            {"eval_time": "100m", "alertname": "PacsAiPositiveRateOutsideBand", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "name": info.name,
                                "version": info.version, "role": "live"},
                 "exp_annotations": {"summary": summary,
                                     "description": rule["annotations"]["description"]}}]},
            {"eval_time": "100m", "alertname": "PacsAiAbstentionRateHigh", "exp_alerts": []},
            {"eval_time": "100m", "alertname": "PacsAiNoFilmsArriving", "exp_alerts": []},
        ]}]}
    test_file = tmp_path / "from-service.test.yml"
    test_file.write_text(yaml.safe_dump(test, sort_keys=False))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "pacs-ai-dashboard.json"


def dashboard_queries() -> list[str]:
    """The dashboard's PromQL, its variables filled in as Grafana would ($attribute with each
    attribute the arrivals are counted by, $version with a pattern)."""
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    attributes = variables["attribute"]["query"].split(",")
    assert set(attributes) == exported_series()["pacs_ai_arrivals_total"]
    queries = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"  # picked at import
        for target in panel["targets"]:
            for attribute in attributes:
                queries.append(target["expr"].replace("$attribute", attribute)
                               .replace("$version", ".*"))
    return sorted(set(queries))


def test_the_dashboard_queries_name_exported_metrics_and_recorded_rules():
    exported = exported_series()
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    queries = dashboard_queries()
    assert any("pacs_ai:model_positive_rate:1d" in q for q in queries)
    for query in queries:
        assert "$" not in query, query
        for name, matchers in SELECTOR.findall(query):
            assert name in exported, (query, name)
            used = set(re.findall(r"([a-z_]+)\s*[=!]~?", matchers))
            assert used <= exported[name] | SCRAPE_LABELS, (name, used)
        for name in re.findall(r"\bpacs_ai:[a-z0-9_:]+", query):
            assert name in recorded, name


@pytest.mark.real_peer
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each query as a recording rule, so promtool's parser checks it."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": query}
        for index, query in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
