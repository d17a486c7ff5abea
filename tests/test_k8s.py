"""deploy/k8s/: the manifests agree with composer itself — its CLI (ports, flags), its admin
endpoints, its drain grace, the Dockerfile's user — and the ConfigMaps hold a config that
`composer check` accepts when mounted the way the Deployment mounts it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import yaml

from composer import load
from composer.cli import _parser
from composer.server import GRACE_SECONDS, ComposerServer

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"

Doc = dict[str, Any]


def documents() -> list[tuple[Path, Doc]]:
    docs = []
    for file in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(file.read_text()):
            if doc is not None:
                docs.append((file, doc))
    return docs


def only(kind: str) -> Doc:
    found = [d for _, d in documents() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def config_maps() -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for _, d in documents() if d.get("kind") == "ConfigMap"}


def container() -> Doc:
    containers = only("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def serve_args() -> Namespace:
    """The Deployment's args as composer's own parser reads them (defaults filled in)."""
    c = container()
    # The Dockerfile has only a CMD (no ENTRYPOINT), which `args` would replace entirely.
    dockerfile = (ROOT / "Dockerfile").read_text()
    if not re.search(r"^ENTRYPOINT\b", dockerfile, re.MULTILINE):
        assert c.get("command") == ["composer"], "without an ENTRYPOINT, args need command: [composer]"
    args = _parser().parse_args([str(a) for a in c["args"]])
    assert args.command == "serve"
    return args


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container()["ports"]}


def pod_labels() -> dict[str, str]:
    return only("Deployment")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def prestop_sleep(hook: Doc) -> float:
    """Seconds a preStop hook sleeps: `sleep: {seconds: N}`, `sleep N` or Python's time.sleep(N)."""
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = " ".join(shlex.quote(str(part)) for part in hook["exec"]["command"])
    match = re.search(r"\bsleep[ (]\s*(\d+(?:\.\d+)?)", command)
    assert match, f"no sleep in preStop {command!r}"
    return float(match.group(1))


def admin_paths() -> set[str]:
    """The paths composer's admin listener really serves."""
    server = ComposerServer(load(ROOT / "routes.yaml"))
    return {r.canonical for r in server._admin_app().router.resources()}


def test_every_document_has_api_version_kind_and_name():
    docs = documents()
    assert docs
    for file, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), file.name
        assert doc.get("metadata", {}).get("name"), f"{file.name}: {doc['kind']} without metadata.name"
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "ConfigMap", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor"} <= kinds


def test_kustomization_lists_every_manifest():
    listed = set(only("Kustomization")["resources"])
    files = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files


def test_container_ports_are_the_ports_composer_listens_on():
    args = serve_args()
    assert container_ports() == {"http": args.port, "admin": args.admin_port}
    assert args.workers == 1, "one process per pod: scale with replicas (the HPA), not --workers"


def test_admin_listener_binds_the_pod_ip_for_probes_and_scrapes():
    # composer's default is 127.0.0.1 (SPEC §9): the kubelet and Prometheus come from outside the pod.
    assert _parser().parse_args(["serve"]).admin_host == "127.0.0.1"
    assert serve_args().admin_host == "0.0.0.0"


def test_probes_hit_readyz_and_healthz_on_the_admin_port():
    c, served = container(), admin_paths()
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in served
        port = get["port"]
        assert port == "admin" or port == serve_args().admin_port, f"{probe} port {port!r}"
        assert container_ports()["admin"] == serve_args().admin_port


def test_termination_grace_covers_prestop_sleep_and_composer_drain():
    spec = only("Deployment")["spec"]["template"]["spec"]
    sleep = prestop_sleep(container()["lifecycle"]["preStop"])
    assert sleep >= 2, "preStop must give endpoint removal time to propagate"
    assert spec["terminationGracePeriodSeconds"] >= sleep + GRACE_SECONDS


def test_service_targets_the_container_ports_by_name():
    service, names = only("Service"), container_ports()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["spec"]["selector"], pod_labels())
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    for p in ports.values():
        assert isinstance(p["targetPort"], str) and p["targetPort"] in names, p
    assert (ports["http"]["port"], ports["http"]["targetPort"]) == (80, "http")
    assert (ports["admin"]["port"], ports["admin"]["targetPort"]) == (serve_args().admin_port, "admin")


def test_service_monitor_scrapes_admin_metrics():
    monitor, service = only("ServiceMonitor"), only("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert endpoint["path"] == "/metrics" and "/metrics" in admin_paths()
        target = by_name[endpoint["port"]]["targetPort"]
        assert container_ports()[target] == serve_args().admin_port


def test_deployment_hpa_and_pdb_select_the_pods():
    deployment, labels = only("Deployment"), pod_labels()
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    hpa = only("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    pdb = only("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    if "minAvailable" in pdb["spec"]:  # must leave room to evict one pod at the HPA's minimum
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_cpu_requests_and_limits_are_set():
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[kind].keys(), kind


def test_runs_as_the_dockerfiles_non_root_user_locked_down():
    uid = int(re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    pod = only("Deployment")["spec"]["template"]["spec"]["securityContext"]
    ctx = container()["securityContext"]
    assert pod["runAsNonRoot"] is True and ctx.get("runAsNonRoot", True) is True
    assert ctx.get("runAsUser", pod.get("runAsUser")) == uid != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    assert (ctx.get("seccompProfile") or pod["seccompProfile"])["type"] == "RuntimeDefault"


def test_config_maps_are_mounted_as_directories_not_subpath():
    """subPath mounts are copied at pod start and never see a ConfigMap update: no hot reload."""
    volumes = {v["name"]: v for v in only("Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    assert mounts.keys() <= volumes.keys()
    defined = config_maps()
    mounted = set()
    for name, volume in volumes.items():
        if "configMap" not in volume:
            continue
        assert volume["configMap"]["name"] in defined, name
        assert "items" not in volume["configMap"], "items would hide keys added later"
        assert name in mounts, f"ConfigMap volume {name} is not mounted"
        assert "subPath" not in mounts[name] and "subPathExpr" not in mounts[name], name
        mounted.add(volume["configMap"]["name"])
    assert mounted == defined.keys()


def mount_config_maps(root: Path) -> None:
    """Write each ConfigMap's keys under root as the Deployment's volumeMounts place them."""
    volumes = {v["name"]: v for v in only("Deployment")["spec"]["template"]["spec"]["volumes"]}
    maps = config_maps()
    for mount in container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for key, text in maps[volume["configMap"]["name"]]["data"].items():
            (folder / key).write_text(text)


def test_config_map_routes_pass_composer_check(tmp_path):
    mount_config_maps(tmp_path)
    args = serve_args()
    config_path = tmp_path / args.config.lstrip("/")
    manifest = str(tmp_path / args.manifest.lstrip("/")) if args.manifest else None
    table = load(config_path, manifest)
    assert table.settings.templates.resolve().is_relative_to(tmp_path)
    assert {r.name for r in table.routes} >= {"home", "product"}
    assert not table.warnings, table.warnings
    if args.manifest:
        assert table.manifest is not None and table.manifest.fragments
    # the CLI says the same
    command = [sys.executable, "-m", "composer", "check", "--config", str(config_path)]
    if manifest:
        command += ["--manifest", manifest]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": ok (" in result.stdout


def test_the_canary_state_folder_is_a_writable_empty_dir():
    """Canary verdicts (SPEC §8) must outlive a container restart, and the ConfigMap folders
    beside the manifest are read-only: COMPOSER_STATE_DIR names an emptyDir mount."""
    from composer.canary import STATE_DIR_ENV

    env = {e["name"]: e.get("value") for e in container().get("env", ())}
    path = env.get(STATE_DIR_ENV)
    assert path, f"{STATE_DIR_ENV} is not set"
    volumes = {v["name"]: v for v in only("Deployment")["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container()["volumeMounts"] if m["mountPath"] == path]
    assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly", False)
