"""The import rules of docs/architecture.md, checked in fresh interpreters by what lands in sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


ENGINE_MODULES = ["worker.engine.engine", "worker.engine.loader", "worker.engine.builtin", "worker.engine.factory",
                  "worker.engine.diffusion_gemma.engine", "worker.engine.diffusion_gemma.tiny",
                  "worker.engine.families", "worker.engine.caches.approx"]


def _modules_brought_by(modules: list[str]) -> dict[str, set[str]]:
    """Import ``modules`` one after another in one fresh interpreter (torch loads once, not once per
    module): what each import added to sys.modules. A module that pulls in a package is named by
    the first import that brought it, and the union is what importing them all brings."""
    code = ("import sys, json, importlib\nseen, brought = set(sys.modules), {}\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    brought[name] = sorted(set(sys.modules) - seen)\n"
            "    seen = set(sys.modules)\n"
            "print(json.dumps(brought))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {name: set(added) for name, added in json.loads(result.stdout.splitlines()[-1]).items()}


# The engine's one import from common/: the sampler vocabulary it shares with the wire format.
ENGINE_IMPORTS_FROM_COMMON = {"common", "common.samplers"}


def test_engine_is_a_pure_torch_library():
    brought = _modules_brought_by(ENGINE_MODULES)
    assert set(brought) == set(ENGINE_MODULES)
    for module, added in brought.items():
        assert not _top(added - ENGINE_IMPORTS_FROM_COMMON) & {*SERVICE_PACKAGES, "db", "api", "common", "pydantic",
                                                               "cli"}, module
        assert not {m for m in added if m.startswith("worker.") and not m.startswith("worker.engine")}, module


def test_db_imports_sqlalchemy_only():
    loaded = _top(_modules_after("import db.models, db.repo, db.session"))
    assert not loaded & {"torch", "celery", "fastapi", "pydantic", "api", "worker", "common"}


def test_package_inits_are_light():
    loaded = _top(_modules_after("import worker, worker.engine, api, db, common"))
    assert "torch" not in loaded and "transformers" not in loaded


def test_worker_tasks_load_torch_only_when_a_task_needs_the_model():
    loaded = _top(_modules_after("import worker.celery_app"))
    assert "torch" not in loaded and "api" not in loaded
