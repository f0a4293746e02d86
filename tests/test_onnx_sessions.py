"""A voice's sessions share one copy of each large weight (``engines/onnx_sessions.py``).

Fixture graphs built here: ``y = x + w`` with ``w`` a weight of the size given. An ``Add`` reads its
weight as it is at each run (no packing), so a session that shares it sees a change made in place.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.onnx_sessions import SHARED_MIN_BYTES, VoiceSessions

CPU = ["CPUExecutionProvider"]


def _adder(weight: np.ndarray, name: str = "w") -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", name], ["y"])],
        "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(weight.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(weight.shape))],
        [numpy_helper.from_array(weight, name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _big(value: float) -> np.ndarray:
    return np.full((SHARED_MIN_BYTES // 4,), value, np.float32)


def _run(session, like: np.ndarray) -> np.ndarray:
    return session.run(None, {"x": np.zeros_like(like)})[0]


def test_sessions_of_a_voice_read_one_copy_of_a_weight_they_have_in_common() -> None:
    sessions = VoiceSessions(CPU)
    weight = _big(1.0)
    first, second = sessions.open(_adder(weight)), sessions.open(_adder(weight), spinning=False, threads=1)
    assert np.array_equal(_run(first, weight), weight) and np.array_equal(_run(second, weight), weight)
    (kept, _), = sessions._weights.values()
    kept[:] = 5.0  # both sessions read it in place
    assert (_run(first, weight) == 5.0).all() and (_run(second, weight) == 5.0).all()


def test_a_weight_of_the_same_name_but_other_content_and_a_small_one_stay_the_sessions_own() -> None:
    sessions = VoiceSessions(CPU)
    ones, twos = _big(1.0), _big(2.0)
    first, other = sessions.open(_adder(ones)), sessions.open(_adder(twos))
    small = np.ones(16, np.float32)
    tiny = sessions.open(_adder(small, "b"))
    assert list(sessions._weights) == ["w"]
    sessions._weights["w"][0][:] = 7.0
    assert (_run(first, ones) == 7.0).all()
    assert np.array_equal(_run(other, twos), twos) and np.array_equal(_run(tiny, small), small)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_sessions_on_a_gpu_keep_their_own_weights() -> None:
    """Only a CPU-only voice shares: a GPU session keeps its weights on the device. Without a
    GPU here onnxruntime runs such a session on the CPU, but the provider list alone decides."""
    sessions = VoiceSessions([("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    weight = _big(1.0)
    assert np.array_equal(_run(sessions.open(_adder(weight)), weight), weight)
    assert not sessions.on_cpu and sessions._weights == {}
    assert VoiceSessions([("CPUExecutionProvider", {})]).on_cpu


def test_a_shared_weight_is_parsed_from_a_graph_file_too(tmp_path) -> None:
    sessions = VoiceSessions(CPU)
    path = tmp_path / "adder.onnx"
    path.write_bytes(_adder(_big(3.0)))
    session = sessions.open(path)
    sessions._weights["w"][0][:] = 4.0
    assert (_run(session, _big(0)) == 4.0).all()


def test_a_session_keeps_its_shared_weights_alive_after_the_sessions_builder_is_gone() -> None:
    """A frames engine's sessions outlive the builder that shared their weights (a fixture or a
    caller may drop it): the weights must not go with it."""
    import gc

    weight = _big(1.5)
    session = VoiceSessions(CPU).open(_adder(weight))
    gc.collect()
    _big(9.0), _big(9.0)  # memory freed above would likely be reused here
    assert np.array_equal(_run(session, weight), weight)
