"""Per-token dynamic int8 quantization of an ONNX encoder: batch-exact int8 for micro-batched serving.

ONNX Runtime's dynamic quantization computes ONE activation scale per MatMul input over the whole batch, so a
query's embedding depends on its batch mates. Here every MatMul with a constant 2-D weight becomes

    scale[b, t]  = max(|x[b, t, :]|) / 127                      (one scale per token, from that token only)
    x_q          = uint8(round(x / scale) + 128)                 (symmetric, zero point 128)
    y            = MatMulInteger(x_q, W_q, 128) * scale * w_scale (W_q int8 per output channel, symmetric)

so results are exactly independent of batch mates and padding, with standard ONNX ops only (Abs, ReduceMax,
Div, Round, Add, Cast, MatMulInteger, Mul). Measurements behind the choice: ``docs/export-notes.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)


def quantize_per_token(src: str | Path, dst: str | Path) -> int:
    """Writes the per-token int8 version of ``src`` to ``dst``; returns how many MatMuls were quantized."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    consts: dict[str, np.ndarray] = {
        "pt_c127": np.array(127.0, np.float32), "pt_eps": np.array(1e-8, np.float32),
        "pt_c128": np.array(128.0, np.float32), "pt_zp": np.array(128, np.uint8),
        "pt_axes": np.array([-1], np.int64),
    }
    new_inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes: list[onnx.NodeProto] = []
    quantized_inputs: dict[str, str] = {}  # Q, K and V share one input: quantize it once
    count = 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        p = f"pt{count}"
        count += 1
        new_inits += [numpy_helper.from_array(w_q, p + "_wq"), numpy_helper.from_array(w_scale.astype(np.float32), p + "_ws")]
        x = node.input[0]
        if x not in quantized_inputs:
            q = quantized_inputs[x] = f"ptq{len(quantized_inputs)}"
            if opset >= 18:
                reduce = helper.make_node("ReduceMax", [q + "_abs", "pt_axes"], [q + "_amax"], keepdims=1)
            else:
                reduce = helper.make_node("ReduceMax", [q + "_abs"], [q + "_amax"], axes=[-1], keepdims=1)
            nodes += [
                helper.make_node("Abs", [x], [q + "_abs"]),
                reduce,
                helper.make_node("Max", [q + "_amax", "pt_eps"], [q + "_amax_eps"]),
                helper.make_node("Div", [q + "_amax_eps", "pt_c127"], [q + "_scale"]),
                helper.make_node("Div", [x, q + "_scale"], [q + "_xs"]),
                helper.make_node("Round", [q + "_xs"], [q + "_xr"]),
                helper.make_node("Add", [q + "_xr", "pt_c128"], [q + "_xa"]),
                helper.make_node("Cast", [q + "_xa"], [q + "_xq"], to=TensorProto.UINT8),
            ]
        q = quantized_inputs[x]
        nodes += [
            helper.make_node("MatMulInteger", [q + "_xq", p + "_wq", "pt_zp"], [p + "_yi"]),
            helper.make_node("Cast", [p + "_yi"], [p + "_yf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "_yf", q + "_scale"], [p + "_y1"]),
            helper.make_node("Mul", [p + "_y1", p + "_ws"], [node.output[0]]),
        ]
    used = {name for n in nodes for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [i for i in new_inits if i.name in used])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    logger.info("per-token int8: %d MatMuls quantized -> %s", count, dst)
    return count
