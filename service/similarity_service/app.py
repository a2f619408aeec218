"""The Litestar app factory: routes, strict JSON bodies, one error map, metrics, OpenAPI, lifespan.

`create_app(settings)` builds everything from settings; the lifespan (lifespan.py) owns the engine
and batcher. OpenAPI is served at /docs (Swagger UI) and /docs/openapi.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from similarity_service import __version__
from similarity_service.controllers import ROUTES, dependencies
from similarity_service.errors import UnsupportedMediaType, exception_handlers
from similarity_service.lifespan import EngineFactory, ServiceState, load_engine, service_lifespan
from similarity_service.metrics import RequestMetricsMiddleware, ServiceMetrics
from similarity_service.schemas import decode_body
from similarity_service.settings import Settings
from similarity_service.workers import METRICS_DIR_ENV, WorkerPeers

JSON_CHARSETS = {"utf-8", "utf8"}


class JSONRequest(Request[Any, Any, Any]):
    """Decodes a route's `data` strictly with `schemas.decode_body`, after checking the body is JSON.

    Litestar's default decoding is lax ("5" becomes 5, duplicate keys pass) and lets invalid UTF-8 and
    deep nesting escape as 500s; the decoded struct is handed to Litestar as is.
    """

    async def json(self) -> Any:
        media_type, options = self.content_type
        # No Content-Type is read as JSON (what `curl --data-binary` without -H and many clients send).
        if media_type and not (media_type == "application/json" or media_type.endswith("+json")):
            raise UnsupportedMediaType("unsupported_media_type", f"Content-Type {media_type} is not JSON")
        if options.get("charset", "utf-8").lower() not in JSON_CHARSETS:
            raise UnsupportedMediaType("unsupported_media_type", "JSON bodies must be UTF-8")
        data_field = self.route_handler.parsed_data_field
        target = data_field.annotation if data_field is not None else Any
        return decode_body(await self.body(), target)


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory = load_engine,
    on_ready: Callable[[], None] | None = None,
    workers: WorkerPeers | None = None,
) -> Litestar:
    """The service app; `engine_factory(settings)` loads and warms the engine (tests pass their own);
    `on_ready()` runs once it is loaded and warm, before readiness turns 200 (the serve command's hook);
    `workers` is given in each of several serving processes (workers.py), whose metrics are then shared."""
    metrics = ServiceMetrics(os.environ.get(METRICS_DIR_ENV) if workers is not None else None)
    service = ServiceState(settings, metrics, on_ready, workers)
    return Litestar(
        route_handlers=ROUTES,
        dependencies=dependencies(service),
        state=State({"service": service}),
        lifespan=[service_lifespan(service, engine_factory)],
        request_class=JSONRequest,
        request_max_body_size=settings.max_body_bytes,
        exception_handlers=exception_handlers(metrics.count_rejection),
        middleware=[RequestMetricsMiddleware(metrics)],
        openapi_config=OpenAPIConfig(
            title="structsim",
            version=__version__,
            description="Chinese sentence-pair similarity with a StructBERT cross-encoder.",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        logging_config=None,  # the serve command configures logging; the library must not
    )
