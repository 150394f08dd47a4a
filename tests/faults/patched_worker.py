"""`python -m tests.faults.patched_worker`: `diffbatch worker` with an engine a test can break or slow down.

A request whose prompt contains POISON_MARK SIGKILLs the worker's own process as soon as the engine is handed it,
every time, as a request that crashes a GPU kernel would. ROW_DELAY_ENV (seconds) delays each finished row, so a
test can act while a worker holds a chunk.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POISON_MARK = "POISON-PILL"
ROW_DELAY_ENV = "FAULTS_ROW_DELAY_S"


def _patched_stream(original):
    delay = float(os.environ.get(ROW_DELAY_ENV, "0"))

    def stream(self, requests, more=None):
        def kill_on_poison(given):
            # The engine sees token ids only; the tiny model's byte tokenizer decodes them to the prompt's text.
            if any(POISON_MARK in self.tokenizer.decode(request.prompt_ids) for request in given):
                os.kill(os.getpid(), signal.SIGKILL)
            return given

        kill_on_poison(requests)
        fed = None if more is None else (lambda free: kill_on_poison(more(free)))  # requests fed mid-run too
        for item in original(self, requests, fed):
            yield item
            time.sleep(delay)

    return stream


def main() -> int:
    from worker.engine.engine import Engine

    Engine.stream = _patched_stream(Engine.stream)
    from cli.main import main as diffbatch

    return diffbatch(["worker"])


if __name__ == "__main__":
    sys.exit(main())
