"""SamplingParams validation names the offending field."""

import pytest

from common.samplers import SAMPLERS
from worker.engine.params import SamplingParams


def test_defaults_are_valid_and_exact_reference():
    params = SamplingParams()
    params.validate()
    assert params.steps_per_block == params.block_length == 32
    assert params.effective_seed == 0
    assert params.sampler == "reference" and SAMPLERS == ("reference", "threshold", "factor", "entropy_bound")


def test_stop_list_becomes_tuple():
    params = SamplingParams(stop=["a", "b"])
    assert params.stop == ("a", "b")
    params.validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be a positive integer"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(presence_penalty=float("inf")), "presence_penalty"),
        (dict(stop=("",)), "stop"),
        (dict(stop=("a", 3)), "stop"),
        (dict(stop=("a", "b", "c", "d", "e")), "stop may hold at most 4"),
        (dict(seed=2**64), "seed"),
        (dict(seed="1"), "seed"),
        (dict(sampler="greedy"), "diffusion.sampler"),
        (dict(sampler="factor", steps=4), "diffusion.steps applies to the reference and threshold samplers only"),
        (dict(sampler="threshold", threshold=0.0), "diffusion.threshold"),
        (dict(sampler="threshold", threshold=1.5), "diffusion.threshold"),
        (dict(sampler="factor", factor=0), "diffusion.factor"),
        (dict(block_length=0), "diffusion.block_length must be a positive integer"),
        (dict(block_length=None), "diffusion.block_length"),
        (dict(steps=0), "diffusion.steps"),
        (dict(steps=33), r"diffusion.steps must be an integer in \[1, block_length=32\]"),
        (dict(steps=8.0), "diffusion.steps"),
    ],
)
def test_invalid_params_raise_value_error_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


def test_valid_variants():
    SamplingParams(max_tokens=1, temperature=2, top_p=0.5, stop=("x",), seed=2**64 - 1, block_length=4,
                   steps=4).validate()
    SamplingParams(seed=-(2**63)).validate()
