"""Deployment checks offline: the Kustomize manifests render and validate (kubernetes-validate --strict),
carry the facts the server relies on, and the Dockerfile is hadolint-clean; seeded mistakes fail."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bundlerec_server.settings import Settings  # noqa: E402
from deploy import validate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "k8s" / "base"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

needs_kustomize = pytest.mark.skipif(
    validate.find_tool("kubectl") is None and validate.find_tool("kustomize") is None,
    reason="kubectl (or kustomize) is not installed: the Kustomize manifests cannot be rendered offline",
)


def rendered(kdir: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(validate.render(kdir)) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of deploy/ to seed mistakes into; returns the copy's repository root."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def seed(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"seed target {old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# --- (a) the real manifests and Dockerfile pass


@needs_kustomize
def test_real_deployment_validates(capsys):
    rc = validate.main([])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ok   deploy/k8s/base: 8 resources valid" in out and "ok   deploy/k8s/overlays/production: 8 resources valid" in out
    assert "ok   deploy/Dockerfile: hadolint clean" in out


# --- (b) seeded mistakes make the validation fail and name the problem

SCHEMA_SEEDS = [
    # (file, old, new, what the report must name)
    ("deployment.yaml", "          livenessProbe:", "          livenessProbee:", "'livenessProbee' was unexpected"),
    ("deployment.yaml", "  replicas: 2", '  replicas: "two"', "'two' is not of type 'integer'"),
    ("pdb.yaml", "kind: PodDisruptionBudget", "kind: PodDisruptionBudgett", "PodDisruptionBudgett"),
    ("service-headless.yaml", "      port: 50051", "      port: 50051\n      targetPortt: grpc", "'targetPortt' was unexpected"),
]


@needs_kustomize
@pytest.mark.parametrize(("file", "old", "new", "named"), SCHEMA_SEEDS, ids=[s[3] for s in SCHEMA_SEEDS])
def test_seeded_schema_mistake_fails(tree, file, old, new, named, capsys):
    seed(tree / "deploy" / "k8s" / "base" / file, old, new)
    rc = validate.main(["--root", str(tree)])
    out = capsys.readouterr().out
    # fails, for the base and the overlay built on it, naming the mistake
    assert rc == 1, out
    assert "FAIL deploy/k8s/base" in out and "FAIL deploy/k8s/overlays/production" in out and named in out


POLICY_SEEDS = [
    ("server.env", "BUNDLEREC_GRACE_S=20", "BUNDLEREC_GRACE_SS=20", "BUNDLEREC_GRACE_SS names no Settings field"),
    ("server.env", "BUNDLEREC_MAX_QUEUE=64", "BUNDLEREC_MAX_QUEUE=lots", "BUNDLEREC_MAX_QUEUE='lots' is not a valid int"),
    ("server.env", "BUNDLEREC_GRACE_S=20", "BUNDLEREC_GRACE_S=60", "terminationGracePeriodSeconds 40 must exceed preStop 5 s + BUNDLEREC_GRACE_S 60 s"),
    ("server.env", "BUNDLEREC_METRICS_HOST=0.0.0.0", "BUNDLEREC_METRICS_HOST=127.0.0.1", "Prometheus cannot reach a loopback address"),
    ("server.env", "BUNDLEREC_LOG_LEVEL=INFO", "BUNDLEREC_LOG_LEVEL=INFO\nBUNDLEREC_AUTH_TOKEN=s3cret", "BUNDLEREC_AUTH_TOKEN is set in plain text"),
    ("deployment.yaml", "terminationGracePeriodSeconds: 40", "terminationGracePeriodSeconds: 20", "terminationGracePeriodSeconds 20 must exceed"),
    ("deployment.yaml", "            grpc:\n              port: 50051\n              service:", "            grpc:\n              port: 50052\n              service:", "readinessProbe probes port 50052"),
    ("deployment.yaml", "          livenessProbe:\n            grpc:\n              port: 50051", "          livenessProbe:\n            tcpSocket:\n              port: 50051", "livenessProbe must be a native grpc probe"),
    ("deployment.yaml", "enableServiceLinks: false", "enableServiceLinks: true", "enableServiceLinks must be false"),
    ("deployment.yaml", "        runAsNonRoot: true\n        runAsUser: 10001", "        runAsNonRoot: true\n        runAsUser: 0", "runAsUser must be a fixed non-zero UID"),
    ("deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem must be true"),
    ("deployment.yaml", "              mountPath: /artifacts\n              readOnly: true", "              mountPath: /artifacts\n              readOnly: false", "must be mounted readOnly"),
    ("deployment.yaml", "value: /var/run/secrets/bundlerec/auth/token", "value: /etc/bundlerec/token", "is not inside a Secret volume mount"),
    ("deployment.yaml", "  replicas: 2", "  replicas: 1", "replicas 1: at least 2"),
    ("service-headless.yaml", "clusterIP: None", 'clusterIP: ""', "no headless Service"),
    ("service-headless.yaml", "publishNotReadyAddresses: false", "publishNotReadyAddresses: true", "publishes not-ready pods"),
    # (kustomize rewrites the common labels in selectors, so seed an extra label no pod has)
    ("pdb.yaml", "      app.kubernetes.io/component: server", "      app.kubernetes.io/component: server\n      tier: cache", "no PodDisruptionBudget selects the server pods"),
]


@needs_kustomize
@pytest.mark.parametrize(("file", "old", "new", "named"), POLICY_SEEDS, ids=[s[3][:40] for s in POLICY_SEEDS])
def test_seeded_policy_mistake_fails(tree, file, old, new, named):
    seed(tree / "deploy" / "k8s" / "base" / file, old, new)
    problems = validate.policy_problems(rendered(tree / "deploy" / "k8s" / "base"))  # the schema check is above
    assert any(named in p for p in problems), problems


# --- (c) the facts that matter, read straight from the rendered YAML


@needs_kustomize
@pytest.mark.parametrize("kdir", validate.overlays(ROOT), ids=lambda p: p.name)
def test_rendered_facts(kdir):
    docs = rendered(kdir)
    dep = one(docs, "Deployment", "bundlerec")
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    cm = one(docs, "ConfigMap")
    assert server["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]

    # every BUNDLEREC_* key in the ConfigMap names a real Settings field, and Settings accepts the values
    names = {f.name for f in fields(Settings)}
    assert cm["data"], "empty ConfigMap"
    for key in cm["data"]:
        assert key.startswith("BUNDLEREC_") and key.removeprefix("BUNDLEREC_").lower() in names, key
    env = {**cm["data"], **{e["name"]: e["value"] for e in server.get("env", [])}}
    settings = Settings.load([], env=env)
    assert str(settings.artifact) == "/artifacts/current"
    assert settings.workers == 1  # one process a pod; scale with replicas

    assert dep["spec"]["replicas"] >= 2
    # headless Service for client-side balancing, on the server's port
    headless = one(docs, "Service", "bundlerec-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert all(labels[k] == v for k, v in headless["selector"].items())
    assert [(p["port"], p["targetPort"]) for p in headless["ports"]] == [(settings.port, "grpc")]
    assert {"name": "grpc", "containerPort": settings.port, "protocol": "TCP"} in server["ports"]

    # native gRPC probes on the serving port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == settings.port, probe
    # readiness asks for the service the server registers in grpc.health.v1 (app.SERVICE_NAME)
    from bundlerec.v1 import bundlerec_pb2 as pb

    assert server["readinessProbe"]["grpc"]["service"] == pb.DESCRIPTOR.services_by_name["BundleRecommender"].full_name

    # drain: the kubelet waits longer than preStop + the server's grace
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_s

    # non-root, read-only, no capabilities, seccomp
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = server["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert set(server["resources"]["requests"]) == set(server["resources"]["limits"]) == {"cpu", "memory"}

    # the token from a Secret file; the artifact from a read-only PVC
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    token_dir = str(Path(str(settings.auth_token_file)).parent)
    assert "secret" in volumes[mounts[token_dir]["name"]]
    assert "BUNDLEREC_AUTH_TOKEN" not in env
    assert mounts["/artifacts"]["readOnly"] is True
    claim = volumes[mounts["/artifacts"]["name"]]["persistentVolumeClaim"]["claimName"]
    one(docs, "PersistentVolumeClaim", claim)

    # metrics reachable from Prometheus; a PDB over the same pods
    assert settings.metrics_port and settings.metrics_host == "0.0.0.0"
    assert {"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"} in server["ports"]
    pdb = one(docs, "PodDisruptionBudget")
    assert all(labels[k] == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


@needs_kustomize
def test_production_overlay_changes_scale_only():
    base = rendered(BASE)
    prod = rendered(ROOT / "deploy" / "k8s" / "overlays" / "production")
    b, p = one(base, "Deployment"), one(prod, "Deployment")
    assert p["spec"]["replicas"] > b["spec"]["replicas"]
    bc, pc = b["spec"]["template"]["spec"]["containers"][0], p["spec"]["template"]["spec"]["containers"][0]
    assert pc["image"].startswith("registry.example.com/") and pc["image"].endswith(":0.1.0")
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "securityContext", "volumeMounts", "lifecycle"):
        assert pc[key] == bc[key], key
    assert one(prod, "ConfigMap")["data"]["BUNDLEREC_GRACE_S"] == one(base, "ConfigMap")["data"]["BUNDLEREC_GRACE_S"]


# --- (d) the Dockerfile


def test_dockerfile_hadolint_clean():
    assert validate.dockerfile_problems(DOCKERFILE, [10001]) == []


DOCKERFILE_SEEDS = [
    ('ENTRYPOINT ["bundlerec-server"]', "ENTRYPOINT bundlerec-server", "DL3025"),  # shell form: SIGTERM goes to sh
    ("USER 10001:10001", "USER root", "DL3002"),  # runs as root
    ("FROM python:3.11.14-slim-bookworm AS runtime", "FROM python:latest AS runtime", "DL3007"),  # unpinned base
    ("USER 10001:10001", "USER bundlerec", "must be a numeric non-root UID"),  # runAsNonRoot cannot verify a name
    ("USER 10001:10001", "USER 10002:10002", "differs from the pods' runAsUser 10001"),
]


@pytest.mark.parametrize(("old", "new", "named"), DOCKERFILE_SEEDS, ids=[s[2] for s in DOCKERFILE_SEEDS])
def test_seeded_dockerfile_mistake_fails(tmp_path, old, new, named):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text())
    seed(bad, old, new)
    problems = validate.dockerfile_problems(bad, [10001])
    assert any(named in p for p in problems), problems


def test_dockerfile_builds_what_the_server_needs_and_nothing_more():
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) == 2, "multi-stage: builder + runtime"
    builder, runtime = stages
    # stubs generated exactly as the Makefile's proto target does
    make_rule = re.search(r"grpc_tools\.protoc (.*)\$<", (ROOT / "Makefile").read_text())
    assert make_rule, "Makefile proto rule not found"
    make_flags = make_rule.group(1).split()
    docker_cmd = re.search(r"grpc_tools\.protoc ([^&]*?)proto/bundlerec/v1/bundlerec\.proto", builder, flags=re.DOTALL)
    assert docker_cmd and docker_cmd.group(1).replace("\\", " ").split() == make_flags
    assert "./client ./server" in builder and "constraints.txt" in builder
    # the runtime stage: no torch, no export, no build tools, no artifact baked in; the one system package is
    # OpenMP's runtime, which LightGBM (the learned ranker) links
    for word in ("torch", "bundlerec_export", "pip install"):
        assert word not in runtime, word
    assert re.findall(r"apt-get install (.*?) *\\?$", runtime, flags=re.MULTILINE) == [
        "-y --no-install-recommends libgomp1=12.2.0-14+deb12u1"]
    assert "rm -rf /var/lib/apt/lists/*" in runtime
    assert re.findall(r"^COPY .*$", runtime, flags=re.MULTILINE) == ["COPY --from=builder /opt/bundlerec /opt/bundlerec"]
    assert re.search(r'^ENTRYPOINT \["bundlerec-server"\]$', runtime, flags=re.MULTILINE)
    assert "BUNDLEREC_ARTIFACT=/artifacts/current" in runtime
    assert re.search(r"^FROM python:3\.11\.\d+-bookworm AS builder", text, flags=re.MULTILINE)
    # the build context: only what the image needs
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*" and {"!requirements.txt", "!proto/", "!client/", "!server/"} <= set(ignore)


def test_image_smoke_repeats_the_builder_steps():
    """deploy/image_smoke.sh stands in for `docker build`: it must run the Dockerfile's builder commands."""
    docker = " ".join(DOCKERFILE.read_text().replace("\\\n", " ").split())
    smoke = " ".join((ROOT / "deploy" / "image_smoke.sh").read_text().replace("\\\n", " ").split())
    for step in (
        "sed -E 's/\\[[^]]*\\]//' requirements.txt > constraints.txt",
        "-c constraints.txt grpcio-tools",
        "-m grpc_tools.protoc -I proto --python_out=client --pyi_out=client --grpc_python_out=client proto/bundlerec/v1/bundlerec.proto",
        "-c constraints.txt ./client ./server",
        "HNSWLIB_NO_NATIVE=1",
    ):
        assert step in docker and step in smoke, step
