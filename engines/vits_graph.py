"""Rewrites of a VITS frontend graph that keep its outputs and cut its time.

In frame streaming the frontend (text encoder, duration predictor, alignment)
runs once over the whole sentence before the first window can be decoded, so
its time is the floor of the first audio. Two rewrites of the graph as Piper
exports it, measured on the bundled voice for a 600-id sentence on 2 CPU cores:

* **Layer norms.** Each is exported as nine elementwise nodes, which
  onnxruntime's own optimiser leaves unfused here; onnxruntime's transformer
  fusion turns them into ``LayerNormalization`` (36 of them; 58 -> 55 ms).
* **Banded relative attention.** The text encoder adds relative-position terms
  only within ±w positions (w = 4). The export computes them against
  embeddings zero-padded to 2L-1 and moves them between relative and absolute
  positions with pads and reshapes of [batch, heads, L, 2L-1] tensors: per
  layer, two extra L²·d matmuls and four L² copies, nearly all of zeros. The
  rewrite reads the 2w+1 diagonals with ``GatherElements`` instead
  (6 layers; 54 -> 41 ms). The sums are the same, term for term.

The same rewrites apply to the whole voice, which sentence mode and short
sentences run (~6 % less time for a short sentence here).

Nothing here is trusted blindly: :func:`optimise` keeps a rewrite only if the
rewritten graph gives the plain graph's outputs (noise off) on test ids, so a
voice exported some other way just keeps the plain graph.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Optional, Sequence

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("engines.vits_graph")

TOLERANCE = 1e-4
"""Largest difference from the plain cut (noise off) at which a rewrite is kept."""


def optimise(plain: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A VITS graph (the split frontend, or the whole voice) with both rewrites, or the plain
    graph where they do not apply or would change its ``outputs``."""
    for chatty in ("fusion_base", "onnxruntime.transformers.onnx_model"):  # a line per pass otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    model = onnx.ModelProto()
    model.CopyFrom(plain)
    try:
        norms = fuse_layer_norms(model)
        layers = band_relative_attention(model)
        if not norms and not layers:
            return plain  # not the graph these rewrites are for
        model = _pruned(model)
        diff = _max_difference(plain, model, outputs)
    except Exception as exc:  # a graph these rewrites do not understand
        log.warning("graph rewrite failed (%s: %s); using the plain graph", type(exc).__name__, exc)
        return plain
    if diff > TOLERANCE:
        log.warning("graph rewrite changed the outputs by %.2g; using the plain graph", diff)
        return plain
    log.info("graph rewritten: %d layer norms fused, %d attention layers banded (outputs within %.1g)", norms, layers, diff)
    return model


def fuse_layer_norms(model: onnx.ModelProto) -> int:
    """Fuse the exported layer-norm patterns in place; returns how many."""
    from onnxruntime.transformers.fusion_layernorm import FusionLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)  # wraps, does not copy
    before = len(wrapped.get_nodes_by_op_type("LayerNormalization"))
    FusionLayerNormalization(wrapped).apply()
    return len(wrapped.get_nodes_by_op_type("LayerNormalization")) - before


class _Graph:
    """Who produces and who reads each tensor, and walks along the data path."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def down(self, tensor: str, op: str) -> Optional[onnx.NodeProto]:
        """The nearest node of type ``op`` fed by ``tensor``, not counting shape arithmetic."""
        todo, seen = deque([tensor]), set()
        while todo:
            for node in self.consumers.get(todo.popleft(), ()):
                if node.op_type == "Shape" or node.output[0] in seen:
                    continue
                seen.add(node.output[0])
                if node.op_type == op:
                    return node
                todo.extend(node.output)
        return None

    def up(self, tensor: str, op: str) -> Optional[onnx.NodeProto]:
        """The nearest node of type ``op`` that ``tensor`` comes from, along first inputs."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type != op:
            node = self.producer.get(node.input[0]) if node.input else None
        return node

    def comes_from(self, tensor: str, node: onnx.NodeProto) -> bool:
        """Whether ``tensor`` is ``node``'s output or derived from it along first inputs."""
        source = self.up(tensor, node.op_type)
        return source is not None and source.output[0] == node.output[0]

    def rewire(self, old: str, new: str) -> None:
        for node in self.consumers.get(old, ()):
            node.input[:] = [new if i == old else i for i in node.input]


def band_relative_attention(model: onnx.ModelProto) -> int:
    """Replace each layer's padded relative-position terms with gathered diagonals, in place;
    returns how many layers. The old nodes are left dangling for :func:`_pruned`.

    Per layer, with q the scaled queries [b, h, L, d], E_k and E_v the [2w+1, d] embeddings and
    p the attention weights [b, h, L, L]:

    * keys: ``scores += B`` where ``B[i, j] = (q·E_kᵀ)[i, j-i+w]`` inside the band, else 0;
    * values: ``out += W·E_v`` where ``W[i, k] = p[i, i+k-w]`` where that exists, else 0.
    """
    graph = _Graph(model.graph)
    initializers = {i.name: i for i in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    index: Optional[str] = None
    layers = 0
    for key_name in [name for name in initializers if name.endswith("emb_rel_k")]:
        value_name = key_name[: -len("k")] + "v"
        emb_k = numpy_helper.to_array(initializers[key_name])
        if value_name not in initializers or emb_k.ndim != 3 or emb_k.shape[0] != 1 or emb_k.shape[1] % 2 != 1:
            continue  # heads not sharing embeddings, or not the VITS layout
        emb_v = numpy_helper.to_array(initializers[value_name])
        key_mm, value_mm = graph.down(key_name, "MatMul"), graph.down(value_name, "MatMul")
        scores = graph.down(key_mm.output[0], "Add") if key_mm is not None else None
        softmax = graph.up(value_mm.input[0], "Softmax") if value_mm is not None else None
        if key_mm is None or value_mm is None or scores is None or softmax is None:
            continue
        relative = [i for i in scores.input if graph.comes_from(i, key_mm)]
        if len(relative) != 1:
            continue
        queries = key_mm.input[0]
        if index is None:
            index = "band"
            nodes += _band_indices(index, queries, emb_k.shape[1] // 2, tensors)
        p = f"{key_name}/band"
        tensors += [
            numpy_helper.from_array(np.ascontiguousarray(emb_k[0].T), f"{p}/emb_k_t"),
            numpy_helper.from_array(np.ascontiguousarray(emb_v[0]), f"{p}/emb_v"),
        ]
        nodes += [
            helper.make_node("MatMul", [queries, f"{p}/emb_k_t"], [f"{p}/rel_logits"]),
            helper.make_node("Pad", [f"{p}/rel_logits", f"{index}/zero_column"], [f"{p}/rel_logits0"], mode="constant"),
            helper.make_node("GatherElements", [f"{p}/rel_logits0", f"{index}/keys"], [f"{p}/key_terms"], axis=3),
            helper.make_node("GatherElements", [softmax.output[0], f"{index}/values"], [f"{p}/diagonals"], axis=3),
            helper.make_node("Mul", [f"{p}/diagonals", f"{index}/values_mask"], [f"{p}/rel_weights"]),
            helper.make_node("MatMul", [f"{p}/rel_weights", f"{p}/emb_v"], [f"{p}/value_terms"]),
        ]
        scores.input[:] = [f"{p}/key_terms" if i == relative[0] else i for i in scores.input]
        graph.rewire(value_mm.output[0], f"{p}/value_terms")
        layers += 1
    if layers:
        model.graph.initializer.extend(tensors)
        model.graph.node.extend(nodes)
    return layers


def _band_indices(s: str, queries: str, window: int, tensors: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Index tensors shared by every layer (all see the same b, h and L):

    * ``keys`` [b,h,L,L]: j-i+w inside the band, else 2w+1 (the zero column padded onto q·E_kᵀ);
    * ``values`` [b,h,L,2w+1]: i+k-w clipped into [0, L), with ``values_mask`` zero where it was clipped.
    """
    span = 2 * window + 1

    def const(name: str, value: object) -> str:
        tensors.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"{s}/{name}"))
        return f"{s}/{name}"

    zero, one, w, n_span = const("0", 0), const("1", 1), const("w", window), const("span", span)
    const("zero_column", [0, 0, 0, 0, 0, 0, 0, 1])

    def node(op: str, inputs: list[str], out: str, **attrs: object) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{s}/{out}"], **attrs)

    return [
        node("Shape", [queries], "shape"),
        node("Slice", [f"{s}/shape", const("at0", [0]), const("at2", [2])], "bh"),
        node("Gather", [f"{s}/shape", f"{s}/at2"], "L1", axis=0),
        node("Squeeze", [f"{s}/L1", const("axis0", [0])], "L"),
        node("Range", [zero, f"{s}/L", one], "j"),
        node("Unsqueeze", [f"{s}/j", const("axis1", [1])], "i"),
        node("Range", [zero, n_span, one], "k"),
        # keys
        node("Sub", [f"{s}/j", f"{s}/i"], "j-i"),
        node("Add", [f"{s}/j-i", w], "rel"),
        node("GreaterOrEqual", [f"{s}/rel", zero], "rel>=0"),
        node("Less", [f"{s}/rel", n_span], "rel<span"),
        node("And", [f"{s}/rel>=0", f"{s}/rel<span"], "in_band"),
        node("Where", [f"{s}/in_band", f"{s}/rel", n_span], "keys2d"),
        node("Concat", [f"{s}/bh", f"{s}/L1", f"{s}/L1"], "keys_shape", axis=0),
        node("Expand", [f"{s}/keys2d", f"{s}/keys_shape"], "keys"),
        # values
        node("Add", [f"{s}/i", f"{s}/k"], "i+k"),
        node("Sub", [f"{s}/i+k", w], "col"),
        node("GreaterOrEqual", [f"{s}/col", zero], "col>=0"),
        node("Less", [f"{s}/col", f"{s}/L"], "col<L"),
        node("And", [f"{s}/col>=0", f"{s}/col<L"], "in_range"),
        node("Where", [f"{s}/in_range", f"{s}/col", zero], "values2d"),
        node("Cast", [f"{s}/in_range"], "values_mask", to=TensorProto.FLOAT),
        node("Concat", [f"{s}/bh", f"{s}/L1", const("span1", [span])], "values_shape", axis=0),
        node("Expand", [f"{s}/values2d", f"{s}/values_shape"], "values"),
    ]


def _pruned(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what no output needs and put the nodes back in topological order."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    wrapped.prune_graph()
    wrapped.topological_sort()
    return wrapped.model


def _max_difference(plain: onnx.ModelProto, rewritten: onnx.ModelProto, outputs: Sequence[str]) -> float:
    """Largest output difference, noise off, over a short and a long run of valid phoneme ids."""
    sessions = [
        onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (plain, rewritten)
    ]
    vocabulary = _vocabulary(plain)
    inputs = {i.name for i in plain.graph.input}
    rng = np.random.default_rng(0)
    worst = 0.0
    for length in (7, 301):
        ids = rng.integers(1, vocabulary, size=(1, length), dtype=np.int64)
        feeds = {
            "input": ids,
            "input_lengths": np.array([length], dtype=np.int64),
            "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32),  # noise off: both are deterministic
            "sid": np.array([0], dtype=np.int64),  # multi-speaker voices only
        }
        feeds = {name: value for name, value in feeds.items() if name in inputs}
        a, b = (s.run(list(outputs), feeds) for s in sessions)
        for x, y in zip(a, b):
            if x.shape != y.shape:
                return float("inf")
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max(initial=0.0)))
    return worst


def _vocabulary(model: onnx.ModelProto) -> int:
    """Number of phoneme ids: rows of the embedding that the ``input`` ids index."""
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input" and node.input[0] in initializers:
            return int(initializers[node.input[0]].dims[0])
    raise ValueError("no phoneme embedding fed by 'input'")
