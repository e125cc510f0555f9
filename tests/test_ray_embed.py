"""Catalog embedding on Ray Data (``bundlerec_export.ray_embed``) against the single-process embed stage.

Ray binds every interface and registers the machine's external address even when told 127.0.0.1, so the Ray
part runs only inside a private network namespace (``scripts/in_netns.sh``: loopback alone, up): the test runs
this file as a script there. The script calls the build's embed stage twice on the tiny artifact's titles, once
in-process and once with ``ray=True`` (a local Ray started in-process, as ``bundlerec-export --ray`` does), while a
thread samples ``ss -ltn``; the test checks the rows, their order, the cosines, the manifest entry and that every
listening socket was on loopback. Skipped only when Ray is not installed or the namespace cannot be made.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_NETNS = ROOT / "scripts" / "in_netns.sh"
NETNS_UNAVAILABLE = 125  # in_netns.sh: unshare/ip missing or not permitted
BATCH = 32  # 300 titles: 10 batches, blocks of 2 batches, the last one partial


def _is_loopback(local: str) -> bool:
    """``ss`` local address (``127.0.0.1:80``, ``[::1]:80``, ``[::ffff:127.0.0.1]:80``, ``*:80``) on loopback?"""
    host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*" / "0.0.0.0" spelled as a wildcard: every interface
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_is_loopback():
    assert all(map(_is_loopback, ["127.0.0.1:6379", "127.0.1.1:1", "[::1]:8265", "[::ffff:127.0.0.1]:41465"]))
    assert not any(map(_is_loopback, ["0.0.0.0:6379", "*:6379", "[::]:1", "10.0.0.5:6379", "[::ffff:10.0.0.5]:1"]))


def test_cli_ray_flags():
    from bundlerec_export.cli import _parser, config_from_args

    base = ["--dataset", "instacart", "--data-dir", "d", "--out", "o"]
    cfg = config_from_args(_parser().parse_args(base), None)
    assert (cfg.ray, cfg.ray_address, cfg.ray_actors, cfg.ray_actor_cpus) == (False, None, 2, 0.5)
    cfg = config_from_args(_parser().parse_args([*base, "--ray", "--ray-actors", "4", "--ray-actor-cpus", "1"]), None)
    assert (cfg.ray, cfg.ray_address, cfg.ray_actors, cfg.ray_actor_cpus) == (True, None, 4, 1.0)
    cfg = config_from_args(_parser().parse_args([*base, "--ray-address", "ray://head:10001"]), None)
    assert cfg.ray and cfg.ray_address == "ray://head:10001" and cfg.as_manifest()["ray"] is True


def test_ray_embedding_matches_single_process(tiny_artifact, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'ray[data]'; see requirements.txt)")
    probe = subprocess.run([str(IN_NETNS), "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode == NETNS_UNAVAILABLE:
        pytest.skip(f"no private network namespace for Ray here: {probe.stderr.strip()}")
    assert probe.returncode == 0, probe.stderr
    proc = subprocess.run([str(IN_NETNS), sys.executable, __file__, str(tiny_artifact), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    local, distributed = np.load(tmp_path / "local.npy"), np.load(tmp_path / "ray.npy")

    assert local.shape == distributed.shape == (result["titles"], local.shape[1]) and result["titles"] >= 200
    cosine = np.sum(local * distributed, axis=1) / (np.linalg.norm(local, axis=1) * np.linalg.norm(distributed, axis=1))
    assert float(cosine.min()) >= 0.9999, f"min cosine {cosine.min():.6f} at row {int(cosine.argmin())}"
    # same order: each Ray row is nearest to its own single-process row
    assert np.array_equal(np.argmax(distributed @ local.T, axis=1), np.arange(len(local)))
    print(f"ray vs single-process: min cosine {cosine.min():.8f}, max |diff| {np.abs(local - distributed).max():.3g}, "
          f"bit-identical {np.array_equal(local, distributed)}; embed {result['ray_part']['embed']}")

    how = result["ray_part"]["embed"]
    assert how["engine"] == "ray" and how["cluster"] == "started in-process" and 1 <= how["actors"] <= 2
    assert how["batch_size"] == BATCH and how["blocks"] == 5 and how["actor_cpus"] == 0.5
    assert result["local_part"]["embed"] == {"engine": "single-process", "batch_size": BATCH}
    assert result["ray_part"]["embedding_dim"] == result["local_part"]["embedding_dim"] == local.shape[1]
    assert result["ray_shut_down"], "a Ray started by the embed stage must be shut down afterwards"

    listening = result["listening"]
    assert len(listening) >= 3, f"the sampler saw no Ray listeners: {listening}"
    assert all(_is_loopback(a) for a in listening), f"Ray listened beyond loopback: {listening}"


# ----------------------------------------------------------------------------------------- inside the namespace


def _sample_listeners(found: set[str], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        found.update(line.split()[3] for line in out.splitlines() if line.strip())


def _embed_in_namespace(artifact: Path, out: Path) -> None:
    """Embeds the artifact's titles single-process and on Ray (started here), recording every listening socket."""
    import ray

    from bundlerec_export.build import embed_stage
    from bundlerec_export.config import BuildConfig
    from bundlerec_server.artifact import EMBEDDINGS, ITEMS, MODEL_FILES, TOKENIZER, ItemTable

    titles = ItemTable.read(artifact / ITEMS).titles
    results: dict = {"titles": len(titles)}
    for name, ray_on in (("local", False), ("ray", True)):
        root = out / name
        for rel in (MODEL_FILES["fp32"], TOKENIZER):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact / rel, root / rel)
        cfg = BuildConfig(dataset="instacart", out=root, embed_batch_size=BATCH, progress=False, ray=ray_on)
        found: set[str] = set()
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_listeners, args=(found, stop), daemon=True)
        sampler.start()
        try:
            emb, part = embed_stage(root, titles, cfg)
        finally:
            stop.set()
            sampler.join()
        assert np.array_equal(np.load(root / EMBEDDINGS), emb)
        np.save(out / f"{name}.npy", emb)
        results[f"{name}_part"] = part
        if ray_on:
            results["listening"] = sorted(found)
            results["ray_shut_down"] = not ray.is_initialized()
    (out / "result.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _embed_in_namespace(Path(sys.argv[1]), Path(sys.argv[2]))
