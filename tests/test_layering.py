"""The import rules of DESIGN.md §1, checked in fresh interpreters by what lands in sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = ("celery", "kombu", "redis", "sqlalchemy", "fastapi", "pydantic_settings")


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def _top(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_api_process_runs_without_torch_or_worker():
    loaded = _top(_modules_after("import api.app; import api.app as a; a.create_app"))
    assert not loaded & {"torch", "transformers", "worker"}


@pytest.mark.parametrize("module", ["worker.engine.engine", "worker.engine.loader", "worker.engine.builtin",
                                    "worker.engine.factory", "worker.engine.diffusion_gemma.engine",
                                    "worker.engine.diffusion_gemma.tiny", "worker.engine.families",
                                    "worker.engine.approx_cache"])
def test_engine_is_a_pure_torch_library(module):
    loaded = _top(_modules_after(f"import {module}"))
    assert not loaded & {*SERVICE_PACKAGES, "db", "api", "common", "pydantic", "cli"}
    assert not {m for m in _modules_after(f"import {module}") if m.startswith("worker.") and
                not m.startswith("worker.engine")}


def test_db_imports_sqlalchemy_only():
    loaded = _top(_modules_after("import db.models, db.repo, db.session"))
    assert not loaded & {"torch", "celery", "fastapi", "pydantic", "api", "worker", "common"}


def test_package_inits_are_light():
    loaded = _top(_modules_after("import worker, worker.engine, api, db, common"))
    assert "torch" not in loaded and "transformers" not in loaded


def test_worker_tasks_load_torch_only_when_a_task_needs_the_model():
    loaded = _top(_modules_after("import worker.celery_app"))
    assert "torch" not in loaded and "api" not in loaded
