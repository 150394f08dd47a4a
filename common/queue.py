"""The Celery app as a message client: broker settings and task names, no task code.

The API sends tasks by name with this app and never imports worker/; the worker registers its tasks
on the same configuration (worker/celery_app.py), so both ends agree on one source of truth.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue
from kombu.transport import TRANSPORT_ALIASES

from common.settings import CONTROL_QUEUE, Settings

# The embedded broker: kombu's SQLAlchemy transport with a 0.1 s poll (see common/sqla_broker.py).
TRANSPORT_ALIASES.setdefault("diffbatch-sqla", "common.sqla_broker:Transport")

VALIDATE_BATCH = "diffbatch.validate_batch"
RUN_CHUNK = "diffbatch.run_chunk"
FINALIZE_BATCH = "diffbatch.finalize_batch"
RECONCILE = "diffbatch.reconcile"
FIRE_SCHEDULES = "diffbatch.fire_schedules"


def make_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url
    if broker.startswith("sqla+"):
        broker = "diffbatch-" + broker
    app = Celery("diffbatch", broker=broker, set_as_current=False)
    options: dict[str, Any] = {}
    if broker.startswith("redis"):
        # A chunk may run for many minutes: the message must stay invisible longer than that, or
        # Redis hands it to a second worker. Priority ordering needs the Redis transport's support.
        options = {"visibility_timeout": 6 * 3600, "queue_order_strategy": "priority"}
    elif broker.startswith("memory"):
        options = {"polling_interval": 0.01}  # tests: the default 1 s poll makes a thread pool crawl
    # The SQLAlchemy transport must not get polling_interval (it is passed to create_engine).
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_default_queue=CONTROL_QUEUE,
        task_acks_late=True,  # a chunk is acknowledged only after its results are in the database
        task_reject_on_worker_lost=True,  # a killed worker's chunk goes back to the queue
        worker_prefetch_multiplier=1,  # a GPU worker reserves one chunk at a time
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_serializer="json", accept_content=["json"], result_backend=None, task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app


def declare_queues(app: Celery, names: list[str]) -> None:
    """Create queues up front: on the SQLite broker, two processes creating one queue at once collide."""
    with app.connection_for_write() as conn:
        for name in names:
            Queue(name, routing_key=name).bind(conn.default_channel).declare()


def queue_depth(app: Celery, name: str) -> int:
    """Messages waiting in a queue (not those a worker holds unacknowledged). A queue the broker does
    not know is empty: Redis drops the key of an empty list."""
    with app.connection_for_read() as conn:
        try:
            depth: int = conn.default_channel.queue_declare(queue=name, passive=True).message_count
            return depth
        except conn.channel_errors:
            return 0
