"""`structsim serve`: the HTTP scoring service (Litestar under uvicorn), draining on SIGTERM.

Exit status: 0 after a clean drain, 1 if the model failed to load or a second signal forced the
exit, 2 for bad settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from similarity_service.settings import SettingsError, add_arguments, load_settings

SHUTDOWN_GRACE_S = 5  # after draining: for responses still being written to finish
# The runner thread gives up the GIL at every device sync; with Python's default 5 ms switch interval it
# then waits up to 5 ms for the event loop to hand it back, on every batch. 0.5 ms bounds that wait
# (measured on an H100: twice the request rate held under a 50 ms p99; docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Precedence: flags > STRUCTSIM_* environment variables > --profile file > defaults. "
        "Every setting is described in docs/configuration.md."
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(vars(args), os.environ)
    except SettingsError as exc:
        print(f"structsim serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    import uvicorn

    from similarity_service.app import create_app
    from similarity_service.server import DrainingServer

    app = create_app(settings)
    service = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(config, service)
    server.run()
    return 1 if service.error is not None or server.forced else 0
