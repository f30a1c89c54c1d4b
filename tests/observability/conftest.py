"""Fixtures for the observability tests: event builders, exported samples, a real Prometheus.

Prometheus is Debian's ``prometheus`` package (``/usr/bin/prometheus``, ``/usr/bin/promtool``;
``PROMETHEUS``/``PROMTOOL`` override the paths); tests that need it skip, naming the package, when
it is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from events.schema import (
    Admitted,
    Completed,
    Queued,
    RegisterRequested,
    Retired,
    StepDone,
    Synced,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"


def make_spec(**overrides: Any) -> AdapterSpec:
    fields: dict[str, Any] = {
        "dataset": DatasetSpec(kind="jsonl", path="data.jsonl"),
        "rewards": (RewardSpec(name="exact_match"),),
        "rank": 4,
        "steps": 3,
    }
    fields.update(overrides)
    return AdapterSpec(**fields)


def step_metrics(step: int, reward: float, **extra: float) -> dict[str, float]:
    """``StepDone.metrics`` as the trainer writes them (every key it produces)."""
    return {
        "reward_mean": reward,
        "response_length": 12.0 + step,
        "samples": 8.0,
        "groups": 2.0,
        "groups_dropped": 0.0,
        "samples_failed": 1.0,
        "loss": 0.5 / step,
        "grad_norm": 1.5,
        "lr": 1e-4,
        "tokens": 96.0,
        "staleness": 1.0,
        "step_s": 0.25,
        "clip_frac": 0.125,
        "ratio": 1.0,
        "neg_logprob": 2.5,
        **extra,
    }


def lifecycle(
    name: str, rid: str, *, steps: int = 3, slot: int = 0, reward: float = 0.5, t: float = 100.0
) -> list[Any]:
    """What the control log holds for one adapter trained to its budget, completed and retired."""
    spec = make_spec(steps=steps)
    env: dict[str, Any] = {"adapter": name, "registration_id": rid, "time": t}
    events: list[Any] = [
        RegisterRequested(**env, spec=spec),
        Admitted(**env, epoch=1, slot=slot, spec=spec),
    ]
    for k in range(1, steps + 1):
        metrics = step_metrics(k, reward + 0.1 * k)
        events.append(StepDone(**env, epoch=1, step=k, version=k, metrics=metrics))
        events.append(Synced(**env, epoch=1, worker="rollout.0", version=k, latency_s=0.2))
    events.append(Completed(**env, epoch=1, step=steps, version=steps))
    events.append(Retired(**env, epoch=1, slot=slot))
    return events


def queued(name: str, rid: str, position: int = 0) -> Queued:
    return Queued(adapter=name, registration_id=rid, position=position, spec=make_spec())


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every exported sample as (name, labels, value)."""
    return [(s.name, dict(s.labels), s.value) for m in registry.collect() for s in m.samples]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(env: str, default: str) -> str:
    path = os.environ.get(env) or shutil.which(Path(default).name) or default
    if not Path(path).exists():
        pytest.skip(f"{default} not found: install Debian's `prometheus` package or set {env}")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("PROMTOOL", "/usr/bin/promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return tool("PROMETHEUS", "/usr/bin/prometheus")


class PrometheusServer:
    """A real Prometheus scraping ``targets`` every second; query it over its HTTP API."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: multilora-test\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"prometheus at {self.url} not ready after {timeout_s} s")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as r:
            body = json.load(r)
        if body["status"] != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector result of ``expr`` (list of {metric, value})."""
        return list(self.api("query", query=expr)["result"])

    def wait_for(self, expr: str, ok: Any, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until ``ok(result)`` holds; returns the result."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: condition not met in {timeout_s} s; last result {result}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Any]:
    """A factory: ``prometheus([targets])`` starts a server; all are stopped after the test."""
    servers: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        server = PrometheusServer(prometheus_bin, tmp_path, targets)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


# --- dashboard queries ---------------------------------------------------------------------------

DASHBOARD = OPS / "grafana" / "dashboards" / "multilora.json"
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$adapter": ".*"}
PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)
LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)$")


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard (panels, nested rows) with variables filled."""
    board = json.loads(path.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    return [fill_vars(e) for e in exprs]


def variable_queries(path: Path = DASHBOARD) -> list[str]:
    """The metric each ``label_values(metric, label)`` template variable reads."""
    names = []
    for var in json.loads(path.read_text())["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.match(query.strip())
        if match is None:
            raise AssertionError(f"variable {var['name']}: unsupported query {query!r}")
        names.append(match.group(1))
    return names


def fill_vars(expr: str) -> str:
    for var, val in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, val)
    if "$" in expr:
        raise AssertionError(f"unknown Grafana variable in {expr!r}")
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords or label names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", e):
        ident = match.group(0)
        if e[match.end() :].lstrip().startswith("(") or ident.lower() in PROMQL_KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(ident)
    return names


def exported_names(registries: list[CollectorRegistry]) -> tuple[set[str], set[str]]:
    """(metric names, sample names) the registries export now; a family without samples (a
    labelled metric never used) still names its metric (``x_total``, ``x_bucket`` ...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    families: set[str] = set()
    sample_names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            families.add(family.name)
            families.update(family.name + s for s in suffixes.get(family.type, ()))
            sample_names.update(s.name for s in family.samples)
    return families, sample_names
