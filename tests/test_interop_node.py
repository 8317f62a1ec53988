"""Interop with the platform's Node API: npm `bullmq` adds the job, this worker runs it,
Node reads the outcome. Run against npm bullmq 6.4.0 and the latest 6.x pinned in
tests/node/package-lock.json."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, running_worker, seed_chat_job, settings_for_test
from uvian_worker.providers.simulator import RunningSimulator, scripted_reply
from uvian_worker.settings import Settings
from uvian_worker.store.database import Database

CLIENT = ROOT / "tests" / "node" / "bullmq-client.mjs"
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not Path(NODE_MODULES).is_dir(),
    reason="needs Node.js and `npm ci --prefix tests/node` (make test does both)",
)


async def node(settings: Settings, *args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "node",
        str(CLIENT),
        *args,
        "--prefix",
        settings.queue_prefix,
        "--redis-url",
        settings.effective_redis_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


@pytest.mark.parametrize("bullmq", ["6.4", "latest"])
async def test_node_producer_sees_completed_chat_job(
    database: Database, simulator: RunningSimulator, bullmq: str
) -> None:
    chat = await seed_chat_job(database, "Plan a picnic")
    settings = settings_for_test(simulator.url)
    async with running_worker(settings):
        outcome = await node(
            settings,
            "run",
            "--bullmq",
            bullmq,
            "--queue",
            settings.chat_queue,
            "--name",
            "ai-chat",
            "--data",
            json.dumps(chat.data),
            "--job-id",
            str(chat.job_id),
            "--attempts",
            "3",
            "--timeout-ms",
            "20000",
        )
        seen = await node(
            settings,
            "inspect",
            "--bullmq",
            bullmq,
            "--queue",
            settings.chat_queue,
            "--job-id",
            str(chat.job_id),
        )

    assert outcome["event"] == "completed", outcome
    assert outcome["state"] == "completed"
    assert outcome["attemptsMade"] == 1
    result = outcome["returnvalue"]
    assert result["status"] == "completed"
    assert result["content"] == "".join(scripted_reply("Plan a picnic", 24))
    assert set(result) == {"status", "messageId", "content", "model", "tokensUsed"}
    assert "completed" in outcome["events"]
    # Node's QueueEvents saw the reply's progress (reported at its first token).
    assert outcome["progressEvents"], outcome
    assert outcome["progressEvents"][0]["messageId"] == result["messageId"]
    assert seen["state"] == "completed" and seen["returnvalue"] == result
    assert seen["attemptsMade"] == 1


@pytest.mark.parametrize("bullmq", ["6.4", "latest"])
async def test_node_producer_sees_bad_input_failed_after_one_attempt(
    database: Database, simulator: RunningSimulator, bullmq: str
) -> None:
    chat = await seed_chat_job(database)
    data = {"jobId": str(chat.job_id), "input": {**chat.input, "userId": "nobody"}}
    settings = settings_for_test(simulator.url)
    async with running_worker(settings):
        outcome = await node(
            settings,
            "run",
            "--bullmq",
            bullmq,
            "--queue",
            settings.chat_queue,
            "--name",
            "ai-chat",
            "--data",
            json.dumps(data),
            "--job-id",
            str(chat.job_id),
            "--attempts",
            "3",
            "--timeout-ms",
            "20000",
        )

    assert outcome["event"] == "failed", outcome
    assert outcome["state"] == "failed"
    assert outcome["attemptsMade"] == 1
    assert outcome["failedReason"] == "invalid ai-chat input: userId must be a UUID"
    assert "retries-exhausted" not in outcome["events"]
