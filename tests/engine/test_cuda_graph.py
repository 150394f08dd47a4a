"""CapturedCall's protocol (worker/engine/cuda_graph.py) without a GPU: the capture itself is
replaced, so what is checked is what the engine relies on around it. (The capture is checked on a
GPU by bench/device_agreement.py: graph and eager steps gave the same tokens on an H200.)"""

import logging

import pytest
import torch

from worker.engine import cuda_graph
from worker.engine.cuda_graph import CapturedCall

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


@pytest.fixture
def counting():
    calls = []

    def fn():
        calls.append(len(calls) + 1)
        return torch.tensor(calls[-1])

    return fn, calls


@pytest.fixture(autouse=True)
def eager_side_stream(monkeypatch):
    monkeypatch.setattr(cuda_graph, "_capture_failed", False)
    monkeypatch.setattr(cuda_graph, "_on_side_stream", lambda device, fn: fn())


def test_first_call_runs_eagerly_then_every_call_replays_the_capture(monkeypatch, counting):
    fn, calls = counting

    class Graph:  # stands in for torch.cuda.CUDAGraph: a replay re-runs what was captured
        def replay(self):
            static.copy_(fn())

    static = torch.tensor(0)
    monkeypatch.setattr(cuda_graph, "_capture", lambda device, f: (Graph(), static))
    call = CapturedCall(fn, CUDA)
    assert call().item() == 1  # the eager warm-up is this call's answer
    assert call() is static and static.item() == 2  # replays fill the graph's output buffer
    assert call().item() == 3 and calls == [1, 2, 3]


def test_a_failed_capture_answers_from_the_eager_call_and_the_process_stops_capturing(
        monkeypatch, counting, caplog):
    fn, calls = counting

    def broken(device, f):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "_capture", broken)
    call = CapturedCall(fn, CUDA)
    with caplog.at_level(logging.WARNING, logger="worker.engine.cuda_graph"):
        assert call().item() == 1
        assert call().item() == 2 and calls == [1, 2]  # eager from now on, no second capture
        later = CapturedCall(fn, CUDA)
        assert not later.capture and later().item() == 3
    assert [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()] == [
        "CUDA graph capture failed, denoising steps run eagerly from now on: "
        "operation not permitted when stream is capturing"]


def test_cpu_calls_run_eagerly_every_time(counting):
    fn, calls = counting
    call = CapturedCall(fn, torch.device("cpu"))
    assert [call().item() for _ in range(3)] == [1, 2, 3] and call.graph is None
