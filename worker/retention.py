"""Retention, run periodically by beat: expired files lose their blob and row, and temporary blobs
that a killed writer left (`*.partial`, untouched for an hour) are removed.

Idempotent and safe with two runners: a row is deleted only while still expired and unused (one
statement), a blob already gone is no error. The input file of a batch still running stays until
the batch ends; the next run deletes it.
"""

from __future__ import annotations

import logging
import time

from common.ids import now
from db import repo
from worker.runtime import Runtime

log = logging.getLogger("diffbatch.worker")
TASK = "diffbatch.retention"
PAGE = 1000
PARTIAL_MAX_AGE_S = 3600  # an upload or result file still being written touches its partial far more often


def purge(rt: Runtime) -> dict[str, int]:
    """Delete what has expired; returns how many files and partial blobs went."""
    report = {"files": _purge_expired_files(rt), "partials": _purge_partials(rt)}
    if any(report.values()):
        log.info("retention: %s", report)
    return report


def _purge_expired_files(rt: Runtime) -> int:
    deleted, t = 0, now()
    while True:
        with rt.session() as session:
            file_ids = repo.expired_file_ids(session, now=t, limit=PAGE)
        if not file_ids:
            return deleted
        for file_id in file_ids:
            # The blob goes first: a run that dies between the two leaves a row the next run deletes,
            # never a blob no row names.
            rt.blobs.delete(file_id)
            with rt.session() as session, session.begin():
                deleted += repo.delete_expired_file(session, file_id=file_id, now=t)
        if len(file_ids) < PAGE:
            return deleted


def _purge_partials(rt: Runtime) -> int:
    return rt.blobs.purge_partials(time.time() - PARTIAL_MAX_AGE_S)
