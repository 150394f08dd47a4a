"""The client side of a fault test: submit a batch over HTTP, follow it through outages, check its files."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import httpx

TERMINAL = {"completed", "failed", "expired", "cancelled"}


class BatchClient:
    """OpenAI Batch calls against one base URL; reads retry through a server that is down or restarting."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url + "/v1", timeout=30)

    def close(self) -> None:
        self.http.close()

    def submit(self, lines: list[dict], endpoint: str = "/v1/completions") -> dict:
        content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        uploaded = self.http.post("/files", files={"file": ("input.jsonl", content)}, data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        created = self.http.post("/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": endpoint,
                                                   "completion_window": "24h"})
        assert created.status_code == 200, created.text
        return created.json()

    def batch(self, batch_id: str) -> dict | None:
        """The batch, or None while the API cannot answer (down, restarting, its database cut off)."""
        try:
            response = self.http.get(f"/batches/{batch_id}")
        except httpx.TransportError:
            return None
        if response.status_code >= 500:
            return None
        assert response.status_code == 200, response.text
        return response.json()

    def wait_until(self, batch_id: str, condition: Callable[[dict], bool], *, timeout: float,
                   on_poll: Callable[[], None] = lambda: None) -> dict:
        """Poll until ``condition(batch)``; ``timeout`` only guards against a hang. ``on_poll`` runs each
        round (e.g. restarting dead workers, as a container's restart policy would)."""
        deadline, batch = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            on_poll()
            batch = self.batch(batch_id) or batch
            if batch is not None and condition(batch):
                return batch
            time.sleep(0.2)
        raise AssertionError(f"batch {batch_id} did not get there in {timeout:.0f} s; last seen: {batch}")

    def wait_terminal(self, batch_id: str, *, timeout: float = 300.0,
                      on_poll: Callable[[], None] = lambda: None) -> dict:
        return self.wait_until(batch_id, lambda b: b["status"] in TERMINAL, timeout=timeout, on_poll=on_poll)

    def wait_mid_batch(self, batch_id: str, *, done_at_least: int, timeout: float = 240.0) -> dict:
        """Wait until the batch runs and at least ``done_at_least`` requests are finished, and say so
        if it finished before a fault could be injected (then the test would prove nothing)."""
        batch = self.wait_until(batch_id, lambda b: b["status"] in TERMINAL or (
            b["status"] == "in_progress" and _done(b) >= done_at_least), timeout=timeout)
        assert batch["status"] == "in_progress" and _done(batch) < batch["request_counts"]["total"], \
            f"the batch was past the point of the fault before it could be injected: {batch}"
        return batch

    def lines_of(self, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        response = self.http.get(f"/files/{file_id}/content")
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.content.splitlines() if line.strip()]

    def results(self, batch: dict) -> tuple[list[dict], list[dict]]:
        """The batch's output lines and error lines."""
        return self.lines_of(batch["output_file_id"]), self.lines_of(batch["error_file_id"])


def _done(batch: dict) -> int:
    counts = batch["request_counts"]
    return counts["completed"] + counts["failed"]


def assert_each_custom_id_once(custom_ids: list[str], output: list[dict], errors: list[dict]) -> None:
    """Every input custom_id appears exactly once across the output and error lines, and nothing else does."""
    seen = Counter(line["custom_id"] for line in output + errors)
    missing = sorted(set(custom_ids) - set(seen))
    repeated = sorted(cid for cid, count in seen.items() if count > 1)
    unknown = sorted(set(seen) - set(custom_ids))
    assert not (missing or repeated or unknown), f"missing {missing}, repeated {repeated}, unknown {unknown}"


def assert_all_succeeded(custom_ids: list[str], batch: dict, output: list[dict], errors: list[dict]) -> None:
    """Exactly once each, every one a 200 in the output file, and a completed batch that counts them so."""
    assert_each_custom_id_once(custom_ids, output, errors)
    assert errors == [], errors[:3]
    assert [line["response"]["status_code"] for line in output] == [200] * len(custom_ids)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": len(custom_ids), "completed": len(custom_ids), "failed": 0}
