"""`diffbatch keys` and `diffbatch tenants` on the configured database, and `diffbatch api` refusing a public
address without a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from cli.main import main
from cli.stack import free_port
from common.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """Run `diffbatch ARGS` in this process on a fresh data folder: (exit code, stdout, stderr)."""
    for name in [n for n in os.environ if n.startswith("DIFFBATCH_")]:
        monkeypatch.delenv(name)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, "--data-dir", str(tmp_path / "data")])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def app_on(tmp_path: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", broker_url="memory://")))


def test_keys_create_prints_the_key_alone_last_and_stores_only_a_hash(cli, tmp_path):
    code, out, _ = cli("keys", "create", "--tenant", "acme")
    assert code == 0
    key = out.splitlines()[-1]
    assert key.startswith("dbk_") and " " not in key and len(key) >= 50
    secret = key.split(".", 1)[1]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("diffbatch.sqlite*"))
    assert secret.encode() not in stored and key.encode() not in stored
    client = app_on(tmp_path)
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/v1/files").status_code == 401


def test_keys_list_never_shows_a_secret(cli):
    keys = [cli("keys", "create", "--tenant", tenant)[1].splitlines()[-1] for tenant in ("acme", "beta")]
    code, table, _ = cli("keys", "list")
    assert code == 0
    header, *rows = table.splitlines()
    assert header.split() == ["id", "tenant", "admin", "created", "last_used", "revoked"]
    assert sorted(row.split()[1] for row in rows) == ["acme", "beta"]
    code, listed, _ = cli("keys", "list", "--json")
    assert code == 0 and {k["tenant"] for k in json.loads(listed)} == {"acme", "beta"}
    assert {k["id"] for k in json.loads(listed)} == {key.removeprefix("dbk_").split(".")[0] for key in keys}
    for key in keys:
        secret = key.split(".", 1)[1]
        assert secret not in table and secret not in listed


def test_keys_revoke_by_key_or_id(cli, tmp_path):
    first = cli("keys", "create", "--tenant", "acme")[1].splitlines()[-1]
    second = cli("keys", "create", "--tenant", "acme")[1].splitlines()[-1]
    second_id = second.removeprefix("dbk_").split(".")[0]
    assert cli("keys", "revoke", first)[0] == 0
    code, out, _ = cli("keys", "revoke", second_id)
    assert code == 0 and f"revoked key {second_id}" in out
    code, out, _ = cli("keys", "revoke", second_id)
    assert code == 0 and "already revoked" in out
    code, _, err = cli("keys", "revoke", "0123456789abcdef")
    assert code == 1 and "no such key" in err
    assert all(row["revoked"] for row in json.loads(cli("keys", "list", "--json")[1]))
    client = app_on(tmp_path)
    for key in (first, second):
        response = client.get("/v1/files", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_keys_import_stores_the_operators_key_once(cli, tmp_path, monkeypatch):
    code, _, err = cli("keys", "import", "--tenant", "default")
    assert code == 2 and "DIFFBATCH_API_KEY" in err
    monkeypatch.setenv("DIFFBATCH_API_KEY", "too-short")
    code, _, err = cli("keys", "import", "--tenant", "default")
    assert code == 2 and "at least 32" in err
    key = "3f1c9a7e5b2d4c6e8a0b1d3f5e7c9a1b3d5f7e9c1a3b5d7f9e1c3a5b7d9f1e3c"  # as from `openssl rand -hex 32`
    monkeypatch.setenv("DIFFBATCH_API_KEY", key)
    code, out, _ = cli("keys", "import", "--tenant", "default")
    assert code == 0 and out.startswith("stored key")
    code, out, _ = cli("keys", "import", "--tenant", "default")  # compose runs it on every `up`
    assert code == 0 and out.startswith("already stored")
    code, _, err = cli("keys", "import", "--tenant", "other")
    assert code == 2 and "already belongs to tenant 'default'" in err
    assert [k["tenant"] for k in json.loads(cli("keys", "list", "--json")[1])] == ["default"]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("diffbatch.sqlite*"))
    assert key.encode() not in stored
    assert app_on(tmp_path).get("/v1/files", headers={"x-api-key": key}).status_code == 200


def test_tenants_set_and_list_quotas(cli):
    code, out, _ = cli("tenants", "set", "acme", "--max-queued-requests", "50")
    assert code == 0 and "acme" in out
    cli("tenants", "set", "beta", "--max-queued-tokens", "7")
    listed = {t["tenant"]: t for t in json.loads(cli("tenants", "list", "--json")[1])}
    assert listed["acme"]["max_queued_requests"] == 50 and listed["acme"]["defaulted"] == ["max_queued_tokens"]
    assert listed["beta"]["max_queued_tokens"] == 7 and listed["beta"]["max_queued_requests"] == 1_000_000
    cli("tenants", "set", "acme", "--max-queued-requests", "default")
    listed = {t["tenant"]: t for t in json.loads(cli("tenants", "list", "--json")[1])}
    assert listed["acme"]["defaulted"] == ["max_queued_requests", "max_queued_tokens"]
    code, _, err = cli("keys", "create", "--tenant", "no spaces")
    assert code == 2 and "tenant name" in err


def _api(data_dir: Path, port: int) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIFFBATCH_")},
           "DIFFBATCH_DATA_DIR": str(data_dir), "DIFFBATCH_BROKER_URL": "memory://"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--host", "0.0.0.0", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_api_on_a_public_address_starts_only_once_a_key_exists(cli, tmp_path):
    port = free_port()
    refused = _api(tmp_path / "data", port)
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == 2
    assert err.strip().count("\n") == 0 and "diffbatch keys create --tenant NAME" in err, err
    key = cli("keys", "create", "--tenant", "acme")[1].splitlines()[-1]
    server = _api(tmp_path / "data", port)
    try:
        deadline = time.monotonic() + 60  # only guards against a hang
        while time.monotonic() < deadline and server.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/files", timeout=2,
                                     headers={"Authorization": f"Bearer {key}"})
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert server.poll() is None, server.communicate()[1][-2000:]
        assert response.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/files", timeout=2).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_client_sends_diffbatch_api_key(monkeypatch):
    from cli.client import auth_headers

    monkeypatch.delenv("DIFFBATCH_API_KEY", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("DIFFBATCH_API_KEY", "dbk_0123456789abcdef.secret")
    assert auth_headers() == {"Authorization": "Bearer dbk_0123456789abcdef.secret"}
