"""The Kubernetes manifests (docker/k8s/) validate offline against the Kubernetes JSON schemas and keep the
invariants the deployment relies on: shutdown fits in the grace period, probes on the right paths, non-root
pods, the HPA's metric exists, the monitoring and rendezvous wiring agree across objects, and the fine-tune
Job's command parses with the store's own CLI. No cluster is needed; `kubectl kustomize` is run when kubectl
is installed."""

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.config import VARIABLES, ServiceConfig
from service.metrics import PREFIX, Metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
# Files applied on their own, not through kustomization.yaml (each one's header says why).
SEPARATE = {"finetune-job.yaml", "store-shell.yaml", "prometheus-adapter-rules.yaml"}
# Variables the pods set that are not the service's own (service/config.py).
NON_SERVICE_ENV = {"XDG_CACHE_HOME", "MPLCONFIGDIR", "MASTER_ADDR", "MASTER_PORT"}
UID = 10001  # the image's user (Dockerfile)


def _load_validator():
    spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validator = _load_validator()


def docs(name: str) -> list[dict]:
    return validator.documents(K8S / name)


def one(name: str, kind: str) -> dict:
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def container(obj: dict, name: str) -> dict:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def env_values(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def mount_of(obj: dict, c: dict, claim: str) -> dict:
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod_spec(obj)["volumes"]}
    mounts = [m for m in c["volumeMounts"] if claims[m["name"]] == claim]
    assert len(mounts) == 1, f"{c['name']} mounts claim {claim} {len(mounts)} times"
    return mounts[0]


DEPLOYMENT = one("deployment.yaml", "Deployment")
SERVER = container(DEPLOYMENT, "server")
SERVICE = one("service.yaml", "Service")
PVC = one("pvc.yaml", "PersistentVolumeClaim")
JOB = one("finetune-job.yaml", "Job")
JOB_SERVICE = one("finetune-job.yaml", "Service")
TRAINER = container(JOB, "trainer")


# -- schema validation ---------------------------------------------------------------------------------------
def test_every_manifest_validates_offline():
    pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate is in it)")
    results = validator.validate_files(validator.manifest_files())
    failed = [f"{r.file} {r.resource}: {r.error}" for r in results if r.error]
    assert not failed, "\n".join(failed)
    checked = {r.resource.split("/")[0] for r in results}
    assert {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "Job",
        "ConfigMap",
        "Kustomization",
    } <= checked


@pytest.mark.parametrize(
    "file, pattern, replacement",
    [
        ("deployment.yaml", r"readinessProbe:", "readinessProbes:"),  # unknown field (strict schemas)
        ("deployment.yaml", r"(terminationGracePeriodSeconds: \d+)", r"\1s"),  # wrong type
        ("servicemonitor.yaml", r"- port:", "- prot:"),  # the vendored CRD schema
        ("prometheus-adapter-rules.yaml", r"metricsQuery:", "metricQuery:"),  # the embedded adapter config
    ],
)
def test_the_validator_catches_mistakes(tmp_path, file, pattern, replacement):
    pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate is in it)")
    text, count = re.subn(pattern, replacement, (K8S / file).read_text(), count=1)
    assert count == 1, f"{pattern!r} not in {file}"
    broken = tmp_path / file
    broken.write_text(text)
    assert any(r.error for r in validator.validate_files([broken]))


def test_kustomization_lists_every_manifest_but_the_separate_ones():
    kustomization = docs("kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    assert all((K8S / f).is_file() for f in listed), listed
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - SEPARATE
    assert SEPARATE <= on_disk


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == sorted(
        [
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceMonitor",
        ]
    )


# -- the server ----------------------------------------------------------------------------------------------
def server_config() -> ServiceConfig:
    """The service's configuration as the pod's environment gives it (fails like the service would)."""
    return ServiceConfig.from_env(env_values(SERVER))


def test_server_environment_is_the_services_and_parses():
    names = {v.name for v in VARIABLES}
    unknown = {e["name"] for e in SERVER["env"]} - names - NON_SERVICE_ENV
    assert not unknown, f"not service variables: {unknown}"
    config = server_config()
    assert (config.host, config.port, config.model) == ("0.0.0.0", 8000, "default@prod")
    assert SERVER["image"] == "gpt2-serve:latest"
    assert SERVER["ports"] == [{"name": "http", "containerPort": config.port, "protocol": "TCP"}]
    # NUM_THREADS follows the CPU request
    threads = next(e for e in SERVER["env"] if e["name"] == "NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert (threads["containerName"], threads["resource"]) == ("server", "requests.cpu")


def test_grace_period_covers_prestop_drain_and_server_shutdown():
    spec = pod_spec(DEPLOYMENT)
    pre_stop = SERVER["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes 1.30+)
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        sleep = float(command[1])
    drain = server_config().drain_timeout
    uvicorn_shutdown = float(
        re.search(r"timeout_graceful_shutdown=(\d+(?:\.\d+)?)", (ROOT / "service" / "__main__.py").read_text()).group(1)
    )
    grace = spec["terminationGracePeriodSeconds"]
    assert sleep > 0
    assert grace > sleep + drain + uvicorn_shutdown, (grace, sleep, drain, uvicorn_shutdown)


def test_probes():
    assert SERVER["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert SERVER["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = SERVER["startupProbe"]
    assert startup["httpGet"]["path"] in ("/health", "/ready")
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "too little time to load the model"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert SERVER[probe]["httpGet"]["port"] == "http"


def test_rollout_never_drops_below_the_current_count_and_the_hpa_owns_replicas():
    spec = DEPLOYMENT["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in spec
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(
    "name, kind", [("deployment.yaml", "Deployment"), ("finetune-job.yaml", "Job"), ("store-shell.yaml", "Pod")]
)
def test_pods_run_non_root_read_only_without_capabilities(name, kind):
    obj = one(name, kind)
    spec = pod_spec(obj)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == UID
    tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert sc.get("runAsUser", UID) != 0
        assert "memory" in c["resources"]["limits"] and {"cpu", "memory"} <= c["resources"]["requests"].keys()
    for c in spec["containers"]:
        assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in c["volumeMounts"]), c["name"]


def test_store_is_seeded_from_the_image_then_mounted_read_only():
    claim = PVC["metadata"]["name"]
    (seed,) = pod_spec(DEPLOYMENT)["initContainers"]
    assert seed["image"] == SERVER["image"]
    assert seed["command"] == ["cp", "-Rn", "/models/.", "/seed/"]
    assert mount_of(DEPLOYMENT, seed, claim)["mountPath"] == "/seed"
    store = mount_of(DEPLOYMENT, SERVER, claim)
    assert store["mountPath"] == server_config().model_store_root == "/models"
    assert store.get("readOnly") is True
    assert "ReadWriteMany" in PVC["spec"]["accessModes"]


# -- Service, monitoring, autoscaling ------------------------------------------------------------------------
def test_service_reaches_the_server_port():
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert SERVICE["spec"]["type"] == "ClusterIP"
    assert SERVICE["spec"]["selector"].items() <= labels.items()
    (port,) = SERVICE["spec"]["ports"]
    assert port == {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    pdb = one("pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_servicemonitor_scrapes_metrics_on_the_service_port():
    monitor = one("servicemonitor.yaml", "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= SERVICE["metadata"]["labels"].items()
    service_ports = {p["name"] for p in SERVICE["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] == "/metrics"


def test_hpa_scales_the_deployment_on_a_gauge_the_service_exports():
    hpa = one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert name.startswith(PREFIX)
    families = {m.name: m.type for m in Metrics().registry.collect()}
    assert families.get(name) == "gauge", f"{name} is not a gauge in service/metrics.py"
    assert re.search(rf'p \+ "{name.removeprefix(PREFIX)}"', (ROOT / "service" / "metrics.py").read_text())


def test_adapter_rule_serves_the_hpa_metric_per_pod():
    hpa_metric = one("hpa.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    config = yaml.safe_load(one("prometheus-adapter-rules.yaml", "ConfigMap")["data"]["config.yaml"])
    rules = [r for r in config["rules"] if r["seriesQuery"].split("{")[0] == hpa_metric]
    assert len(rules) == 1, config["rules"]
    rule = rules[0]
    exposed = re.sub(rule["name"]["matches"], rule["name"]["as"], hpa_metric)
    assert exposed == hpa_metric
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


# -- the fine-tuning Job -------------------------------------------------------------------------------------
def torchrun_argv() -> list[str]:
    script = re.sub(r"\\\n\s*", " ", TRAINER["args"][0])
    (line,) = [ln.strip() for ln in script.splitlines() if "torchrun" in ln]
    argv = shlex.split(line)
    assert argv[0] == "exec"
    env = env_values(TRAINER)
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv[1:]]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_finetune_job_is_an_indexed_job_of_torchrun_nodes():
    spec = JOB["spec"]
    assert spec["completionMode"] == "Indexed"
    argv = torchrun_argv()
    assert argv[0] == "torchrun"
    launcher = argv[: argv.index("-m")]
    nodes = int(option(launcher, "--nnodes"))
    assert spec["completions"] == spec["parallelism"] == nodes == 2
    assert option(launcher, "--nproc_per_node") == "1"
    assert option(launcher, "--node_rank") == "$JOB_COMPLETION_INDEX"
    assert pod_spec(JOB)["restartPolicy"] == "Never"


def test_rendezvous_address_is_pod_0_through_the_headless_service():
    argv = torchrun_argv()
    job_name, svc = JOB["metadata"]["name"], JOB_SERVICE["metadata"]["name"]
    assert pod_spec(JOB)["subdomain"] == svc
    assert option(argv, "--master_addr") == f"{job_name}-0.{svc}"
    assert JOB_SERVICE["spec"]["clusterIP"] == "None"
    assert JOB_SERVICE["spec"]["selector"].items() <= JOB["spec"]["template"]["metadata"]["labels"].items()
    # the server's Service and ServiceMonitor must not pick up the training pods
    assert not SERVICE["spec"]["selector"].items() <= JOB["spec"]["template"]["metadata"]["labels"].items()
    port = int(option(argv, "--master_port"))
    assert port in {p["port"] for p in JOB_SERVICE["spec"]["ports"]}
    assert port in {p["containerPort"] for p in TRAINER["ports"]}


def test_finetune_arguments_parse_with_the_store_cli_and_stay_on_the_store_volume():
    from model_store.__main__ import _parser

    argv = torchrun_argv()
    assert argv[argv.index("-m") + 1] == "model_store"
    args = _parser().parse_args(argv[argv.index("-m") + 2 :])
    assert args.command == "finetune"
    store = mount_of(JOB, TRAINER, PVC["metadata"]["name"])["mountPath"]
    assert env_values(TRAINER)["MODEL_STORE_ROOT"] == store and not store_read_only(TRAINER, store)
    assert str(args.run_dir).startswith(store + "/")
    assert all(p.startswith(store + "/") for p in args.data)
    assert args.name and not args.resume


def store_read_only(c: dict, path: str) -> bool:
    return any(m["mountPath"] == path and m.get("readOnly") for m in c["volumeMounts"])
