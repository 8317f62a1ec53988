"""`uvian-worker`: run the worker, apply migrations, serve the simulator, run the demo,
and the operators' commands (stats, retry-failed, enqueue, health).

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

import asyncpg

from uvian_worker import __version__
from uvian_worker.errors import ConfigError, StoreUnavailable, WorkerError
from uvian_worker.observability.logs import configure_logging
from uvian_worker.observability.redaction import redact
from uvian_worker.settings import load_settings
from uvian_worker.store.database import describe

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_FAILED = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        return _run_async(command(args))
    except ConfigError as exc:
        print(f"uvian-worker: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except (WorkerError, asyncpg.PostgresError) as exc:
        # Postgres or Redis refused an operator command: one line, not a traceback.
        print(f"uvian-worker: {redact(describe(exc))}", file=sys.stderr)
        return EXIT_FAILED
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

    stats = commands.add_parser(
        "stats", help="each queue's counts, its recent failed jobs and the live workers"
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    stats.add_argument(
        "--failed", type=int, default=5, metavar="N", help="recent failed jobs per queue (5)"
    )
    stats.set_defaults(command=_cmd_stats)

    retry = commands.add_parser(
        "retry-failed", help="move failed jobs back to waiting, with their attempts reset"
    )
    retry.add_argument("--queue", help="one queue (default: each queue the worker consumes)")
    retry.add_argument("--limit", type=int, default=1000, help="at most this many per queue")
    retry.set_defaults(command=_cmd_retry_failed)

    enqueue = commands.add_parser(
        "enqueue", help="add a job as the API does: its `queued` row, then the BullMQ job"
    )
    kinds = enqueue.add_subparsers(dest="kind", required=True, metavar="KIND")
    chat = kinds.add_parser("chat", help="an ai-chat job")
    chat.add_argument("--conversation-id", required=True)
    chat.add_argument("--user-id", required=True)
    chat.add_argument("--message-id", required=True, help="the user's message, already saved")
    chat.add_argument("--message", required=True)
    notification = kinds.add_parser("notification", help="a notification job")
    notification.add_argument("--user-id", required=True, help="the recipient")
    notification.add_argument("--type", dest="notification_type", required=True)
    notification.add_argument("--data", default="{}", help="a JSON object")
    enqueue.set_defaults(command=_cmd_enqueue)

    health = commands.add_parser(
        "health", help="exit 0 when a live worker is taking jobs (for container health checks)"
    )
    health.add_argument("--worker-id", help="only the worker with this id")
    health.add_argument(
        "--this-host", action="store_true", help="only workers on this host (a container's own)"
    )
    health.set_defaults(command=_cmd_health)
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
    timeout_s = settings.connect_timeout_s
    try:
        if args.create_database:
            await migrations.create_database_if_missing(dsn, timeout_s=timeout_s)
        applied = await migrations.apply_migrations(dsn, timeout_s=timeout_s)
    except StoreUnavailable as exc:
        raise ConfigError(f"DATABASE_URL: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise ConfigError(f"DATABASE_URL: {describe(exc)}") from None
    logger.info("Migrations up to date", extra={"applied_now": applied})
    return 0


async def _cmd_simulator(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False, database_url="postgresql://unused")
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker.providers.simulator import SimulatorConfig, start_simulator
    from uvian_worker.runtime.lifecycle import ShutdownSignals

    config = SimulatorConfig(
        first_token_delay_ms=args.first_token_ms,
        tokens_per_s=args.tokens_per_s,
        reply_tokens=args.reply_tokens,
    )
    signals = ShutdownSignals()
    try:
        simulator = await start_simulator(config, host=args.host, port=args.port)
    except OSError as exc:
        raise ConfigError(f"--port: cannot listen on {args.host}:{args.port}: {exc}") from None
    await signals.received
    await simulator.stop()
    return 0


async def _cmd_demo(_args: argparse.Namespace) -> int:
    from uvian_worker.demo import run_demo

    return await run_demo()


async def _cmd_stats(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False)
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker import ops

    return await ops.stats(settings, args.json, args.failed)


async def _cmd_retry_failed(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False)
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker import ops

    return await ops.retry_failed(settings, args.queue, args.limit)


async def _cmd_enqueue(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False)
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker import ops

    return await ops.enqueue(
        settings,
        args.kind,
        user_id=args.user_id,
        conversation_id=getattr(args, "conversation_id", None),
        message_id=getattr(args, "message_id", None),
        message=getattr(args, "message", None),
        notification_type=getattr(args, "notification_type", None),
        data=getattr(args, "data", None),
    )


async def _cmd_health(args: argparse.Namespace) -> int:
    settings = load_settings(require_provider=False)
    configure_logging(settings.log_level, settings.log_format.value)
    from uvian_worker import ops

    return await ops.health(settings, args.worker_id, this_host=args.this_host)
