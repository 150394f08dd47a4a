"""create_app(settings): the FastAPI application, its routers and OpenAI-style error handling."""

from __future__ import annotations

from fastapi import FastAPI

from api.auth import KeyCheck
from api.body_limit import LimitBodySize
from api.errors import install_error_handlers, without_422
from api.hardening import RefuseUnstorableText
from api.metrics import router as metrics_router
from api.queue import Queue
from api.routes import batches, files, message_batches, system
from api.routes import schedules as schedules_routes
from api.routes import status as status_routes
from api.routes import workers as workers_routes
from common.settings import Settings
from common.storage import open_blob_store
from db.session import make_engine, make_session_factory


def create_app(settings: Settings | None = None, *, queue: Queue | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="diffbatch", version="0.1.0",
                  description="OpenAI Batch API compatible batch generation for diffusion LMs")
    app.state.settings = settings
    app.state.session_factory = make_session_factory(make_engine(settings.resolved_database_url))
    app.state.blobs = open_blob_store(settings)
    app.state.queue = queue or Queue(settings)
    app.state.key_check = KeyCheck(settings)
    install_error_handlers(app)
    app.add_middleware(RefuseUnstorableText)
    app.add_middleware(LimitBodySize, limit=settings.max_upload_bytes)
    for module in (files, batches, system):
        app.include_router(module.router)
    app.include_router(workers_routes.router)  # /v1/workers
    app.include_router(schedules_routes.router)  # /v1/schedules
    app.include_router(message_batches.router)  # /v1/messages/batches (Anthropic's Message Batches)
    app.include_router(metrics_router)  # /metrics (Prometheus)
    app.include_router(status_routes.router)  # the status page at / and /v1/status
    without_422(app)
    return app
