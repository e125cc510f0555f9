"""Runs the server from an image-equivalent venv (see image_smoke.sh) and checks what Kubernetes relies on.

``python deploy/image_smoke.py WORK``: WORK holds ``bundlerec/`` (the venv), ``artifacts/v1`` and
``artifacts/current -> v1``. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bundlerec.client import Client
from bundlerec.errors import BundleRecError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(work: Path) -> int:
    venv, artifacts = work / "bundlerec", work / "artifacts"
    listed = subprocess.run([venv / "bin" / "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    heavy = names & {"torch", "transformers", "optimum", "pytest", "bundlerec-export"}  # scipy comes with lightgbm
    assert not heavy, f"the runtime venv carries {heavy}"
    assert {"lightgbm", "lleaves", "llvmlite"} <= names, "the learned ranker's packages are missing"
    print(f"venv: {len(names)} packages, none of torch/transformers/optimum/pytest/export; lightgbm and lleaves present")

    # the environment a pod gets: the base ConfigMap (ports moved to free ones), a token file
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}
    for line in (ROOT / "deploy" / "k8s" / "base" / "server.env").read_text().split():
        key, value = line.split("=", 1)
        env[key] = value
    port, metrics = free_port(), free_port()
    secret = Path(tempfile.mkdtemp()) / "token"
    secret.write_text(os.urandom(16).hex() + "\n")
    token = secret.read_text().strip()
    env.update(BUNDLEREC_ARTIFACT=str(artifacts / "current"), BUNDLEREC_PORT=str(port), BUNDLEREC_METRICS_PORT=str(metrics),
               BUNDLEREC_WATCH_INTERVAL_S="1", BUNDLEREC_AUTH_TOKEN_FILE=str(secret))
    t0 = time.monotonic()
    proc = subprocess.Popen(["bundlerec-server"], env=env, cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = Client(f"127.0.0.1:{port}", token=token, timeout=5)
        status = ""
        while status != "SERVING" and time.monotonic() - t0 < 120 and proc.poll() is None:
            try:
                status = client.health("bundlerec.v1.BundleRecommender")
            except BundleRecError:
                time.sleep(0.2)
        assert status == "SERVING", f"never SERVING (exit {proc.poll()})"
        print(f"health SERVING {time.monotonic() - t0:.1f} s after start")
        version = client.info().artifact_version
        bundles = list(client.recommend("organic milk"))
        assert bundles, "no bundles"
        print(f"serving {version}: Recommend with the token -> {len(bundles)} bundles")
        try:
            Client(f"127.0.0.1:{port}", timeout=5).info()
            raise AssertionError("a call without the token was accepted")
        except BundleRecError as exc:
            assert exc.code.name == "UNAUTHENTICATED", exc
            print("without the token: UNAUTHENTICATED")

        # publish v2 the documented way: a complete folder, then an atomic symlink swap
        shutil.copytree(artifacts / "v1", artifacts / "v2", dirs_exist_ok=True)
        manifest = json.loads((artifacts / "v2" / "manifest.json").read_text())
        manifest["artifact_version"] = version + "-v2"
        (artifacts / "v2" / "manifest.json").write_text(json.dumps(manifest))
        os.symlink("v2", artifacts / "current.new")
        os.replace(artifacts / "current.new", artifacts / "current")
        t1 = time.monotonic()
        while client.info().artifact_version != version + "-v2":
            assert time.monotonic() - t1 < 30, "no hot reload within 30 s"
            time.sleep(0.2)
        print(f"symlink swap -> hot reload to {version}-v2 in {time.monotonic() - t1:.1f} s")
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        reloads = [line for line in page.splitlines() if line.startswith("bundlerec_reloads_total")]
        assert reloads, "no reload metric"
        print(f"metrics on :{metrics}: {reloads}")

        t2 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=float(env["BUNDLEREC_GRACE_S"]) + 10)
        assert rc == 0, f"exit {rc} after SIGTERM"
        print(f"SIGTERM -> exit 0 in {time.monotonic() - t2:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
        if proc.returncode:
            print(out[-3000:], file=sys.stderr)
    print("image smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
