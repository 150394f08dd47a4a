"""Servers a fault test owns and breaks: its own redis-server, and a TCP proxy that can cut PostgreSQL off."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from cli.stack import _dies_with, free_port

REDIS_BINARY = "redis-server"


class RedisServer:
    """A private, non-persistent redis-server on a free loopback port; `restart_empty` loses every message."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which(REDIS_BINARY)
        if binary is None:
            raise FileNotFoundError(f"{REDIS_BINARY} is not on PATH")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_dies_with(os.getpid()))
        self._wait_answering(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart_empty(self) -> None:
        """Kill the server outright and start a new, empty one on the same port."""
        self.stop()
        self.start()

    def _wait_answering(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.log_path}") from None
                time.sleep(0.05)
            finally:
                client.close()


class TcpProxy:
    """Forwards a loopback port to ``upstream``. `cut` refuses new connections and breaks open ones, as a
    database host that went away; `restore` serves again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream, self.port = upstream, free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._serving: threading.Event | None = None

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port is free at once
        listener.settimeout(0.1)  # close() does not wake a blocked accept() on Linux: poll a flag instead
        self._serving = threading.Event()
        self._serving.set()
        threading.Thread(target=self._accept, args=(listener, self._serving), daemon=True).start()

    def cut(self) -> None:
        if self._serving is not None:
            self._serving.clear()
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            _close(sock)

    def _accept(self, listener: socket.socket, serving: threading.Event) -> None:
        with listener:
            while serving.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    server = socket.create_connection(self.upstream, timeout=5)
                except OSError:
                    _close(client)
                    continue
                server.settimeout(None)
                with self._lock:
                    if not serving.is_set():  # cut while this connection was being made
                        _close(client)
                        _close(server)
                        continue
                    self._sockets.update((client, server))
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):  # one side ended: end the pair, as a real connection would
            with self._lock:
                self._sockets.discard(sock)
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() on this socket
    except OSError:
        pass
    sock.close()
