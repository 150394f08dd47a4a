"""Startup checks: each finds one cause a process would die of later, and says it in one line with the fix.

They run before anything is started or submitted; a failed one is a StartupError, which the command
prints as `diffbatch COMMAND: MESSAGE` and exits 2 on.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import uuid

from common.settings import Settings

CONNECT_TIMEOUT_S = 5


class StartupError(Exception):
    """A check failed; the message names the cause and the fix."""


def check_model(settings: Settings) -> None:
    """The model folder exists, is readable and holds a checkpoint (config.json)."""
    path = settings.model_path
    fix = "set DIFFBATCH_MODEL (or `run --model`) to a checkpoint folder"
    if not path.exists():
        raise StartupError(f"no model folder at {path}: {fix}")
    if not path.is_dir():
        raise StartupError(f"the model {path} is not a folder: {fix}")
    config = path / "config.json"
    if not config.is_file():
        raise StartupError(f"no config.json in the model folder {path}: {fix} (one with config.json and the weights)")
    if not os.access(path, os.R_OK | os.X_OK) or not os.access(config, os.R_OK):
        raise StartupError(f"cannot read the model folder {path} (permissions): let this user read it, "
                           "e.g. chmod -R a+rX on it")


def check_data_dir(settings: Settings) -> None:
    """The data folder exists or can be made, and a file can be written in it."""
    folder = settings.data_dir
    probe = folder / f".write-check-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"cannot write the data folder {folder} ({exc.strerror or exc}): fix its permissions, "
                           "or choose another with --data-dir (DIFFBATCH_DATA_DIR)") from exc


def check_port(host: str, port: int) -> None:
    """Nothing listens on host:port yet (the API would exit at once)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is in use (another diffbatch serve?): stop what holds "
                                   "it, or choose another with --port (DIFFBATCH_API_PORT)") from exc
            raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another "
                               "--host/--port (DIFFBATCH_API_HOST, DIFFBATCH_API_PORT)") from exc


def check_database(settings: Settings) -> None:
    """A database server named by DIFFBATCH_DATABASE_URL answers (the embedded SQLite needs the data folder only)."""
    if settings.database_url is None:
        return
    from sqlalchemy import create_engine, text

    url = settings.database_url
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    try:
        engine = create_engine(url, connect_args=args, pool_pre_ping=False)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - a driver's own error class: report its first line
        raise StartupError(f"cannot reach the database at {redact(url)} ({_first_line(exc)}): start it, or fix "
                           "DIFFBATCH_DATABASE_URL") from exc


def check_broker(settings: Settings) -> None:
    """A broker named by DIFFBATCH_BROKER_URL answers (the embedded one is a file in the data folder)."""
    if settings.broker_url is None:
        return
    from kombu import Connection

    url = settings.broker_url
    try:
        with Connection(url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - kombu and its transports raise their own classes
        raise StartupError(f"cannot reach the broker at {redact(url)} ({_first_line(exc)}): start it, or fix "
                           "DIFFBATCH_BROKER_URL") from exc


def redact(url: str) -> str:
    """The URL with its password, if any, replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    text = str(cause).strip().splitlines()
    return text[0] if text else type(exc).__name__
