"""Fixtures: one tiny random built-in checkpoint per test session, written to a temp folder."""

import pytest
import torch

from worker.engine.builtin.create import create_tiny_random_model
from worker.engine.engine import Engine
from worker.engine.loader import load_model


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """The tiny model gains nothing from intra-op threads, and they spin badly on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return create_tiny_random_model(tmp_path_factory.mktemp("tiny") / "diffbatch-tiny-random", seed=0)


@pytest.fixture(scope="session")
def loaded(tiny_path):
    return load_model(str(tiny_path))


@pytest.fixture(scope="session")
def engine(loaded):
    return Engine(loaded, max_batch_size=8)
