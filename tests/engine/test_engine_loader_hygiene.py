"""Loader errors (import rules for every package are in tests/test_layering.py)."""

import json
import shutil
from pathlib import Path

import pytest

from worker.engine.loader import load_model


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype(tiny_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_path), dtype="int8")


def test_checkpoint_without_mask_token(tiny_path, tmp_path):
    copy = Path(shutil.copytree(tiny_path, tmp_path / "nomask"))
    for name, key in (("config.json", "mask_token_id"), ("tokenizer_config.json", "mask_token")):
        data = json.loads((copy / name).read_text())
        data.pop(key)
        (copy / name).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no mask token"):
        load_model(str(copy))


def test_float64_load(tiny_path):
    import torch

    assert load_model(str(tiny_path), dtype="float64").model.dtype == torch.float64
