"""The simulator's application: its routes behind one gate, and a listener on a port."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from uvian_worker.providers.simulator.config import SimulatorConfig
from uvian_worker.providers.simulator.openai_routes import OpenAIRoutes
from uvian_worker.providers.simulator.responses import error_response, json_response
from uvian_worker.providers.simulator.runpod_routes import RunPodRoutes
from uvian_worker.providers.simulator.stats import SIMULATOR_STATS, SimulatorStats

logger = logging.getLogger(__name__)

# aiohttp waits this long for open handlers at stop before cancelling them; a
# stalled stream would otherwise hold stop() for the library's default minute.
_SHUTDOWN_GRACE_S = 0.1
# The default listen backlog (128) drops SYNs when a benchmark opens 1,000 streams at once.
_LISTEN_BACKLOG = 2048

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Gate:
    """What every request passes (the count by route, the API key) and the stats route."""

    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self.config = config
        self.stats = stats

    @web.middleware
    async def guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "unmatched"
        self.stats.record(route)
        key = self.config.api_key
        if key is not None and route != "sim_stats":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_response(401, "invalid_api_key", "missing or wrong API key")
        return await handler(request)

    async def sim_stats(self, _: web.Request) -> web.Response:
        return json_response(self.stats.as_json())


def build_app(config: SimulatorConfig) -> web.Application:
    """The simulator's routes; `app[SIMULATOR_STATS]` holds its stats."""
    stats = SimulatorStats()
    gate = _Gate(config, stats)
    openai = OpenAIRoutes(config, stats)
    runpod = RunPodRoutes(config, stats)
    app = web.Application(middlewares=[gate.guard])
    app[SIMULATOR_STATS] = stats
    app.on_cleanup.append(runpod.close)

    add = app.router
    for name, prefix in (("openai", ""), ("runpod_openai", "/v2/{endpoint_id}/openai")):
        add.add_post(f"{prefix}/v1/chat/completions", openai.chat, name=f"{name}_chat")
        add.add_get(f"{prefix}/v1/models", openai.models, name=f"{name}_models")
    add.add_post("/v2/{endpoint_id}/run", runpod.run, name="runpod_run")
    add.add_get("/v2/{endpoint_id}/stream/{job_id}", runpod.stream, name="runpod_stream")
    add.add_get("/v2/{endpoint_id}/status/{job_id}", runpod.status, name="runpod_status")
    add.add_post("/v2/{endpoint_id}/cancel/{job_id}", runpod.cancel, name="runpod_cancel")
    add.add_get("/_sim/stats", gate.sim_stats, name="sim_stats")
    return app


@dataclass
class RunningSimulator:
    url: str
    stats: SimulatorStats
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Serve the simulator until `stop()`; port 0 picks a free port."""
    app = build_app(config)
    # Handler cancellation lets a stream notice a client that left while it slept.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S
    )
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=_LISTEN_BACKLOG).start()

    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    logger.info("simulator listening on %s:%s", url_host, bound_port)
    return RunningSimulator(f"http://{url_host}:{bound_port}", app[SIMULATOR_STATS], runner)
