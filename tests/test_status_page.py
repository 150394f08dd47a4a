"""The status page at `/` and the JSON it polls (`GET /v1/status`): what each key sees, progress, and a
real headless chromium watching a running batch's progress move until it is done."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from common.ids import now
from db import keys, repo
from db.progress import report_chunk_tokens
from tests.harness import Service, completion_line
from tests.live_server import live_server
from worker import pipeline, validation

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1280,1000"]
WAIT_S = 120  # only guards a hang


def new_key(svc: Service, tenant: str, *, admin: bool = False) -> str:
    with svc.runtime.session() as session, session.begin():
        return keys.create_key(session, tenant_id=tenant, now=now(), admin=admin)[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(svc: Service, count: int, key: str | None = None) -> dict:
    content = b"".join(json.dumps(completion_line(f"r{n}", seed=n)).encode() + b"\n" for n in range(count))
    headers = bearer(key) if key else {}
    uploaded = svc.client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                               headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    created = svc.client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                   "endpoint": "/v1/completions"}, headers=headers)
    assert created.status_code == 200, created.text
    return created.json()


def status(svc: Service, key: str | None = None) -> dict:
    response = svc.client.get("/v1/status", headers=bearer(key) if key else {})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def one_per_chunk(tmp_path, tiny_model):
    """A service whose chunks hold one request each, each chunk a run of its own (no feeding), so a batch's
    requests finish one by one."""
    return Service.embedded(tmp_path, tiny_model, chunk_size=1, max_batch_size=1, feed_ahead_chunks=0)


def test_the_page_is_public_but_its_data_needs_a_key(one_per_chunk):
    svc = one_per_chunk
    new_key(svc, "alice")
    page = svc.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("status.js", "text/javascript"), ("status.css", "text/css")):
        served = svc.client.get(f"/static/{name}")
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind), name
    assert svc.client.get("/static/..%2Fapp.py").status_code == 404
    assert svc.client.get("/v1/status").status_code == 401
    assert svc.client.get("/v1/status?limit=0").status_code in (400, 401)


def test_a_tenant_sees_its_own_batches_and_an_admin_key_every_tenants(one_per_chunk):
    svc = one_per_chunk
    alice, bob, admin = new_key(svc, "alice"), new_key(svc, "bob"), new_key(svc, "ops", admin=True)
    alices, bobs = submit(svc, 1, alice)["id"], submit(svc, 1, bob)["id"]

    for key, tenant, expected in ((alice, "alice", [alices]), (bob, "bob", [bobs])):
        seen = status(svc, key)
        assert (seen["scope"], seen["tenant_id"]) == ("tenant", tenant)
        assert [b["id"] for b in seen["batches"]] == expected
    every = status(svc, admin)
    assert every["scope"] == "all"
    assert {(b["id"], b["tenant_id"]) for b in every["batches"]} == {(alices, "alice"), (bobs, "bob")}
    # Everywhere else an admin key is its own tenant's: it reads no other tenant's batch by id.
    assert svc.client.get(f"/v1/batches/{alices}", headers=bearer(admin)).status_code == 404
    assert svc.client.get("/v1/batches", headers=bearer(admin)).json()["data"] == []
    bad = svc.client.get("/v1/status?limit=0", headers=bearer(alice))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


def test_progress_moves_with_finished_requests_and_running_tokens(one_per_chunk):
    svc = one_per_chunk
    rt = svc.runtime
    with rt.session() as session, session.begin():
        repo.upsert_worker(session, name=rt.name, model=rt.model_name, queue=rt.model_queue, max_positions=64,
                           now=now())
    batch_id = submit(svc, 2)["id"]
    validation.validate_batch(rt, batch_id)
    with rt.session() as session:
        first, second = [c.id for c in repo.chunks_of(session, batch_id=batch_id)]
    assert status(svc)["queues"] == [{"model": rt.model_name, "pending": 2, "running": 0}]

    pipeline.run_chunk(rt, first)
    seen = status(svc)
    batch = seen["batches"][0]
    assert (batch["status"], batch["request_counts"]) == ("in_progress", {"total": 2, "completed": 1, "failed": 0})
    assert batch["progress"] == 0.5 and batch["eta_s"] is not None and batch["tokens_done"] > 0
    assert seen["queues"] == [{"model": rt.model_name, "pending": 1, "running": 0}]
    assert [(w["name"], w["model"], w["live"]) for w in seen["workers"]] == [(rt.name, rt.model_name, True)]

    # A running chunk's reported tokens move the bar before its request finishes.
    with rt.session() as session, session.begin():
        assert repo.lease_chunk(session, chunk_id=second, worker=rt.name, now=now())
        report_chunk_tokens(session, chunk_id=second, worker=rt.name, tokens=2)
    moved = status(svc)["batches"][0]
    assert moved["tokens_done"] == batch["tokens_done"] + 2 and 0.5 < moved["progress"] < 1


# ------------------------------------------------------------------------------------ the browser


def chrome(profile: Path):
    """Debian's chromium through its chromedriver (never a downloaded browser); CI=true must have them."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI") == "true":
            raise AssertionError("CI=true but chromium is missing: apt-get install -y chromium chromium-driver")
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)


READ_ROW = """const row = document.querySelector(`tr[data-batch-id="${arguments[0]}"]`);
return row && {status: row.dataset.status, done: Number(row.dataset.requestsDone), text: row.innerText};"""


def test_the_browser_shows_a_running_batch_progress_until_done(one_per_chunk, tmp_path, monkeypatch):
    svc = one_per_chunk
    engine = svc.runtime.engine
    real_stream, gate = engine.stream, threading.Semaphore(0)

    def one_result_per_release(requests, more=None):  # the test lets each request finish in turn
        for item in real_stream(requests, more):
            assert gate.acquire(timeout=WAIT_S), "the test never released this request"
            yield item

    monkeypatch.setattr(engine, "stream", one_result_per_release)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with svc, live_server(svc.client.app) as base:
        driver = chrome(tmp_path / "chromium-profile")
        try:
            batch_id = submit(svc, 3)["id"]
            driver.get(f"{base}/?poll=250")
            wait = WebDriverWait(driver, WAIT_S)
            readings = [wait.until(lambda d: (r := d.execute_script(READ_ROW, batch_id)) and
                                   r["status"] == "in_progress" and r)]
            assert readings[0]["done"] == 0 and "0 / 3 requests" in readings[0]["text"]
            gate.release()
            readings.append(wait.until(lambda d: (r := d.execute_script(READ_ROW, batch_id)) and
                                       r["done"] >= 1 and r))
            assert readings[1] != readings[0] and "1 / 3 requests" in readings[1]["text"]
            wait.until(lambda d: d.find_element(By.ID, "rate").text != "-")
            screenshot(driver, tmp_path)
            gate.release(2)
            done = wait.until(lambda d: (r := d.execute_script(READ_ROW, batch_id)) and
                              r["status"] == "completed" and r)
            assert done["done"] == 3 and "3 / 3 requests" in done["text"]
            workers = driver.find_element(By.ID, "workers").text
            assert svc.runtime.name in workers and svc.runtime.model_name in workers

            # Once keys exist the page asks for one; an admin key's view names every tenant.
            admin = new_key(svc, "ops", admin=True)
            driver.refresh()
            field = wait.until(lambda d: (f := d.find_element(By.ID, "key")).is_displayed() and f)
            field.send_keys(admin + "\n")
            wait.until(lambda d: d.execute_script(READ_ROW, batch_id))
            assert driver.find_element(By.ID, "scope").text == "every tenant (admin key)"
            assert "local" in driver.find_element(By.CSS_SELECTOR, f'tr[data-batch-id="{batch_id}"]').text
        finally:
            gate.release(100)  # never leave the worker thread waiting
            driver.quit()


def screenshot(driver, tmp_path: Path) -> None:
    """A picture of the page mid-batch, for a person to look at (STATUS_PAGE_SCREENSHOT: where to copy it)."""
    path = tmp_path / "status.png"
    driver.save_screenshot(str(path))
    if target := os.environ.get("STATUS_PAGE_SCREENSHOT"):
        shutil.copyfile(path, target)
