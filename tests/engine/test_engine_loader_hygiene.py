"""Loader errors and the engine's import rules."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.loader import load_model

REPO = Path(__file__).resolve().parents[2]


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


def _run(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_engine_imports_no_service_packages():
    code = (
        "import worker.engine.engine, sys; "
        "bad=[m for m in ('celery','sqlalchemy','fastapi','redis','pydantic_settings','db','api') "
        "if m in sys.modules]; assert not bad, bad"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_engine_package_import_is_light():
    result = _run("import worker.engine, sys; assert 'torch' not in sys.modules")
    assert result.returncode == 0, result.stderr
