"""`uvian-worker`: run the worker, apply migrations, serve the simulator, run the demo.

Every command reads its settings the same way (environment, then `.env`). A
setting that is missing or wrong ends the command with one line on stderr and
exit code 2; nothing else prints a traceback unless it is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from uvian_worker import __version__
from uvian_worker.errors import ConfigError
from uvian_worker.observability.logs import configure_logging
from uvian_worker.settings import load_settings

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        return _run_async(command(args))
    except ConfigError as exc:
        print(f"uvian-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvian-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"uvian-worker {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="take jobs from the queues until SIGTERM/SIGINT")
    run.set_defaults(command=_cmd_run)

    migrate = commands.add_parser("migrate", help="apply pending supabase/migrations to Postgres")
    migrate.add_argument(
        "--create-database",
        action="store_true",
        help="create the database DATABASE_URL names if it does not exist (development)",
    )
    migrate.set_defaults(command=_cmd_migrate)

    sim = commands.add_parser("simulator", help="serve the LLM simulator (OpenAI and RunPod APIs)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8399)
    sim.add_argument("--first-token-ms", type=float, default=0.0)
    sim.add_argument("--tokens-per-s", type=float, default=0.0, help="0 = as fast as possible")
    sim.add_argument("--reply-tokens", type=int, default=24)
    sim.set_defaults(command=_cmd_simulator)

    demo = commands.add_parser("demo", help="run a few chat jobs end to end on local services")
    demo.set_defaults(command=_cmd_demo)
    return parser


async def _cmd_run(_args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker.app import run_worker

    await run_worker(settings)
    return 0


async def _cmd_migrate(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False)
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker.store import migrations

    dsn = settings.database_url.get_secret_value()
    try:
        if args.create_database:
            await migrations.create_database_if_missing(dsn)
        applied = await migrations.apply_migrations(dsn)
    except OSError as exc:
        raise ConfigError(f"DATABASE_URL: cannot connect to Postgres: {exc.strerror}") from None
    logger.info("Migrations up to date", extra={"applied_now": applied})
    return 0


async def _cmd_simulator(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False, database_url="postgresql://unused")
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker.providers.simulator import SimulatorConfig, start_simulator
    from uvian_worker.runtime.lifecycle import wait_for_stop_signal

    config = SimulatorConfig(
        first_token_delay_ms=args.first_token_ms,
        tokens_per_s=args.tokens_per_s,
        reply_tokens=args.reply_tokens,
    )
    simulator = await start_simulator(config, host=args.host, port=args.port)
    logger.info("Simulator listening", extra={"url": simulator.url})
    await wait_for_stop_signal(lambda: None)
    await simulator.stop()
    return 0


async def _cmd_demo(_args: argparse.Namespace) -> int:
    from uvian_worker.demo import run_demo

    return await run_demo()
