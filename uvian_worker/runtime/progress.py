"""BullMQ progress updates of running jobs, sent in batches.

A streaming reply reports its progress to BullMQ once a second, so that Node
`QueueEvents` listeners see it. Through the package, each update is a script
call of its own on redis-py; at a thousand replies that was 8 % of the worker's
CPU. Here the package's own script (`updateProgress`, with the keys and
arguments the package gives it) is packed and sent with every other update
queued at that moment, in one round trip.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis
from bullmq import Job
from redis.exceptions import NoScriptError, ResponseError

from uvian_worker.command_batches import CommandBatcher, pack

_SCRIPT = "updateProgress"


class ProgressRefused(Exception):
    """BullMQ's script refused the update (the job is gone), or Redis could not run it."""


class _ScriptNotLoaded(Exception):
    pass


class ProgressReporter:
    def __init__(self, client: redis.Redis) -> None:
        self._batches = CommandBatcher(client, "progress updates", _refused)

    async def report(self, job: Job, progress: Any) -> None:
        """Set `job`'s progress, as `Job.updateProgress` does; raises `ProgressRefused`."""
        scripts = job.backend.scripts
        job_id = str(job.id)
        keys = (scripts.toKey(job_id), scripts.keys["events"], scripts.keys["meta"])
        # The package's own serialization, so listeners read what they always read.
        value = json.dumps(progress, separators=(",", ":"), allow_nan=False)
        sha = scripts.commands[_SCRIPT].sha
        command = pack("EVALSHA", sha, len(keys), *keys, job_id, value)
        job.progress = progress
        try:
            await self._batches.send([command], _check)
        except _ScriptNotLoaded:
            # Redis lost its script cache (a restart, SCRIPT FLUSH); the package's own
            # call loads the script again.
            await job.updateProgress(progress)


def _check(replies: list[Any]) -> None:
    [reply] = replies
    if isinstance(reply, NoScriptError):
        raise _ScriptNotLoaded
    if isinstance(reply, ResponseError):
        raise ProgressRefused(f"Redis refused the progress update: {reply}")
    if isinstance(reply, int) and reply < 0:
        raise ProgressRefused(f"BullMQ refused the progress update (code {reply})")


def _refused(exc: BaseException) -> ProgressRefused:
    return ProgressRefused(f"the progress update was not sent: {type(exc).__name__}")
