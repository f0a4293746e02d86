"""Which device a Piper worker's sessions get, decided before any session exists."""

from __future__ import annotations

import onnxruntime
import pytest

from engines import piper
from engines.piper import CUDA, DeviceError, pick_device, session_providers


@pytest.fixture
def gpu_offered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """onnxruntime as onnxruntime-gpu reports itself on a GPU machine; records preload calls."""
    calls: list[str] = []
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: calls.append("preload"), raising=False)
    return calls


def test_auto_runs_piper_on_the_cpu_even_where_cuda_is_offered(gpu_offered: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=piper.log.name)
    assert pick_device("auto") is False
    assert gpu_offered == []  # nothing of CUDA's is loaded for a CPU worker
    assert "--device cuda" in caplog.text


def test_cuda_loads_the_pip_packaged_cuda_libraries_first(gpu_offered: list[str]) -> None:
    assert pick_device("cuda") is True
    assert gpu_offered == ["preload"]


def test_cuda_without_a_gpu_build_and_unknown_devices_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="use auto, cpu or cuda"):
        pick_device("gpu")
    assert pick_device("cpu") is False and pick_device("auto") is False


def test_every_cuda_session_searches_no_algorithms_and_keeps_float32() -> None:
    """Options measured on an H200: see CUDA_OPTIONS."""
    (name, options), cpu = session_providers(True)
    assert (name, cpu) == (CUDA, "CPUExecutionProvider")
    assert options == {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
    assert session_providers(False) == ["CPUExecutionProvider"]
