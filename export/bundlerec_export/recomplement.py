"""Cold-start complements of a catalog without orders, in the build and for an existing artifact.

:func:`catalog_cold_start` is the build's complements stage for a catalog without orders: the shipped cold-start
model (:mod:`.cold_start`) over base-MiniLM title embeddings (the served ones when the encoder is the base model,
else embedded again, :mod:`.base_space`), substitutes excluded, the anti-hub correction for a catalog without
categories. ``python -m bundlerec_export.recomplement --artifact A`` recomputes ``complements.npz`` of an existing
artifact that way (no full build) and publishes it atomically: a hard-linked copy of ``A`` gets the new lists and a
new manifest (entry, checksums, ``artifact_version``), then replaces ``A`` by rename.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bundlerec_server import artifact as A

from . import cold_start as cs
from . import folders

logger = logging.getLogger(__name__)

SPACES = ("base", "served")


class RecomplementError(Exception):
    """The setting cannot be honoured (wrong space, catalog with orders, unreadable artifact)."""


def catalog_cold_start(served_emb: np.ndarray, titles: list[str], categories: list[str] | None, *,
                       served_is_base: bool, work: Path, space: str = "base", hub: bool = True, top_k: int = 20,
                       threads: int = 0, progress: bool = False) -> tuple[A.Complements, dict[str, Any]]:
    """Cold-start lists of every item and their manifest entry (embedding space, hub correction, seconds).

    ``space`` "base": the model reads base-MiniLM embeddings: ``served_emb`` when ``served_is_base``, else the
    titles embedded again (cached in ``work``); "served": ``served_emb`` as it is (refused when its width is not
    the model's). ``hub``: :data:`cold_start.FOREIGN_HUB_CORRECTION` when ``categories`` is None."""
    if space not in SPACES:
        raise RecomplementError(f"cold-start space must be one of {SPACES}, not {space!r}")
    model = cs.load_default_model()
    if space == "served" or served_is_base:
        if served_emb.shape[1] != model.emb_dim:
            raise RecomplementError(f"the cold-start model reads {model.emb_dim}-d embeddings, the served encoder "
                                    f"gives {served_emb.shape[1]}: use the base space")
        emb, embed_info = served_emb, {"seconds": 0.0}
        source = "served embeddings (the base MiniLM)" if served_is_base else "served embeddings (another encoder)"
    else:
        from .base_space import BaseSpaceError, base_embeddings

        try:
            emb, embed_info = base_embeddings(titles, work, threads=threads, progress=progress)
        except BaseSpaceError as exc:
            raise RecomplementError(str(exc)) from exc
        source = "titles embedded again with the base MiniLM (the served encoder is another one)"
    correction = cs.FOREIGN_HUB_CORRECTION if hub and categories is None else None
    t0 = time.perf_counter()
    comps = cs.cold_start_complements(emb, categories, titles, model, top_k=top_k, hub=correction)
    seconds = round(time.perf_counter() - t0, 2)
    info = {"method": cs.COLD_START_METHOD, "model": cs.MODEL_FILE.name, "model_meta": model.meta, "top_k": top_k,
            "anchors": int((np.diff(comps.indptr) > 0).sum()), "pairs": int(len(comps.indices)), "from_orders": False,
            "substitutes_excluded": True,
            "substitutes": ("same category" if categories is not None else "same title cluster (~250 items)")
                           + ", cos >= 0.8 or token Jaccard >= 0.5 (in the space below)",
            "embedding_space": {"space": "base" if (served_is_base or space == "base") else "served",
                                "source": source, **embed_info},
            "hub_correction": None if correction is None else {
                **correction.__dict__, "applies_to": "catalogs without orders or categories"},
            "seconds": seconds, "extra_embed_seconds": embed_info["seconds"]}
    logger.info("cold-start complements for %d items in %.1f s (+ %.1f s embedding, %s)", info["anchors"], seconds,
                embed_info["seconds"], source)
    return comps, info


def served_is_base(manifest: dict[str, Any]) -> bool:
    """Whether the artifact's item embeddings come from the packaged base MiniLM (not fine-tuned, no other model)."""
    enc = manifest.get("encoder") or {}
    built = manifest.get("build_config") or {}
    return (not enc.get("fine_tuned", False) and not enc.get("student") and built.get("base_model") is None
            and enc.get("base_model") == "sentence-transformers/all-MiniLM-L6-v2")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links of ``src``'s files under ``dst`` (copies across file systems); never writes into a linked file."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def recomplement(artifact: Path, out: Path | None = None, *, work: Path | None = None, space: str = "base",
                 hub: bool = True, top_k: int | None = None, threads: int = 0,
                 progress: bool = False) -> dict[str, Any]:
    """Recomputes the cold-start complements of ``artifact`` (a catalog without orders) into ``out`` (default: in
    place), atomically; returns the new manifest."""
    from .build import version_part

    t0 = time.perf_counter()
    artifact = Path(artifact).resolve()
    out = (Path(out) if out is not None else artifact).resolve()
    try:
        manifest = A.read_manifest(artifact)
    except A.ArtifactError as exc:
        raise RecomplementError(str(exc)) from exc
    if out != artifact and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise RecomplementError(f"{out}: exists; refusing to replace anything but the artifact itself")
    items = A.ItemTable.read(artifact / A.ITEMS)
    if np.any(items.orders > 0):
        raise RecomplementError(f"{artifact}: the catalog has orders; its complements come from them: rebuild it")
    categories = list(items.categories) if any(items.categories) else None
    served = np.load(artifact / A.EMBEDDINGS)
    work = Path(work) if work is not None else artifact.parent / f"{artifact.name}.work"
    k = int(top_k or (manifest.get("complements") or {}).get("top_k") or 20)
    comps, info = catalog_cold_start(served, list(items.titles), categories, served_is_base=served_is_base(manifest),
                                     work=work, space=space, hub=hub, top_k=k, threads=threads, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.recomplement-", dir=out.parent))
    try:
        _link_tree(artifact, tmp)
        (tmp / A.COMPLEMENTS).unlink()  # a hard link to the old file: write a new one, never into it
        comps.write(tmp / A.COMPLEMENTS)
        (tmp / A.MANIFEST).unlink()
        version = version_part(tmp, manifest.get("dataset", "artifact"))
        info["recomputed"] = {"from": manifest.get("artifact_version"), "previous_method":
                              (manifest.get("complements") or {}).get("method"),
                              "command": "python -m bundlerec_export.recomplement",
                              "at": version["created_at"], "seconds": round(time.perf_counter() - t0, 2)}
        new = {k2: v for k2, v in manifest.items() if k2 not in ("files", "format_version")}
        new["complements"] = info
        new.update(version)
        written = A.write_manifest(tmp, new)
        A.read_manifest(tmp)  # what the server will verify
        folders.publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("complements of %s recomputed into %s in %.1f s (version %s)", artifact, out,
                time.perf_counter() - t0, written["artifact_version"])
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.recomplement", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True, help="artifact of a catalog without orders")
    p.add_argument("--out", type=Path, help="write the result here instead of replacing --artifact")
    p.add_argument("--work", type=Path, help="cache of base-space embeddings (default <artifact>.work)")
    p.add_argument("--space", choices=SPACES, default="base", help="embeddings the cold-start model reads")
    p.add_argument("--no-hub", action="store_false", dest="hub", help="no anti-hub correction")
    p.add_argument("--top-k", type=int, help="complements per item (default: the artifact's)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: library default)")
    args = p.parse_args(argv)
    from .offline import ensure_offline

    ensure_offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest = recomplement(args.artifact, args.out, work=args.work, space=args.space, hub=args.hub,
                                top_k=args.top_k, threads=args.threads)
    except RecomplementError as exc:
        p.exit(2, f"recomplement: {exc}\n")
    entry = {k: v for k, v in manifest["complements"].items() if k != "model_meta"}
    print(json.dumps({"artifact_version": manifest["artifact_version"], "complements": entry}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
