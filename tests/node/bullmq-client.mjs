#!/usr/bin/env node
// The platform API's side of a BullMQ queue, for the Python interop tests.
//
// Each subcommand prints exactly one JSON object on stdout and exits 0. A usage
// error exits 2 and an unreachable Redis exits 3, both with one line on stderr.
// Run `node bullmq-client.mjs --help` for the synopsis.

import { parseArgs } from 'node:util';
import { Redis } from 'ioredis';

const USAGE = `usage: node bullmq-client.mjs <command> [options]

commands:
  add        --queue Q --name N --data JSON --job-id ID [--attempts 3] [--backoff-ms 1000]
  run        same as add, plus [--timeout-ms 30000]: add, then wait for completed/failed
  inspect    --queue Q --job-id ID
  counts     --queue Q
  obliterate --queue Q

common options:
  --bullmq 6.4|latest   npm bullmq release line to use (default latest)
  --prefix P            queue key prefix (default bull)
  --redis-url URL       default $REDIS_URL or redis://127.0.0.1:6379`;

const OPTION_SPEC = {
  bullmq: { type: 'string', default: 'latest' },
  queue: { type: 'string' },
  name: { type: 'string' },
  data: { type: 'string' },
  'job-id': { type: 'string' },
  attempts: { type: 'string', default: '3' },
  'backoff-ms': { type: 'string', default: '1000' },
  'timeout-ms': { type: 'string', default: '30000' },
  prefix: { type: 'string', default: 'bull' },
  'redis-url': { type: 'string', default: process.env.REDIS_URL || 'redis://127.0.0.1:6379' },
  help: { type: 'boolean', default: false },
};

// The module each --bullmq value loads; `bullmq-6.4` is an npm alias in package.json.
const BULLMQ_MODULES = { '6.4': 'bullmq-6.4', latest: 'bullmq' };

// Retention the platform's API sets on every job it adds.
const REMOVE_ON_COMPLETE = { age: 3600, count: 1000 };
const REMOVE_ON_FAIL = { age: 86400 };

const REDIS_PROBE_TIMEOUT_MS = 3000;

class UsageError extends Error {}
class RedisUnreachableError extends Error {}

function parseCommandLine(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTION_SPEC, allowPositionals: true });
  } catch (error) {
    throw new UsageError(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (positionals.length !== 1) {
    throw new UsageError('expected exactly one command');
  }
  return { command: positionals[0], options: values };
}

function required(options, key) {
  const value = options[key];
  if (value === undefined || value === '') {
    throw new UsageError(`--${key} is required`);
  }
  return value;
}

function nonNegativeInteger(options, key) {
  const value = Number(options[key]);
  if (!Number.isInteger(value) || value < 0) {
    throw new UsageError(`--${key} must be a non-negative integer, got ${options[key]}`);
  }
  return value;
}

function jsonOption(options, key) {
  const text = required(options, key);
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new UsageError(`--${key} is not valid JSON: ${error.message}`);
  }
}

async function loadBullmq(options) {
  const moduleName = BULLMQ_MODULES[options.bullmq];
  if (moduleName === undefined) {
    throw new UsageError(`--bullmq must be 6.4 or latest, got ${options.bullmq}`);
  }
  return import(moduleName);
}

// One probe connection that fails fast: BullMQ's own connections retry forever,
// which would turn a missing Redis into a hung test instead of a clear error.
async function connectProbe(redisUrl) {
  const client = new Redis(redisUrl, {
    lazyConnect: true,
    connectTimeout: REDIS_PROBE_TIMEOUT_MS,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  // The socket error (ECONNREFUSED, ENOTFOUND) says more than the rejection.
  let socketError = null;
  client.on('error', (error) => {
    socketError = error;
  });
  try {
    await client.connect();
    await client.ping();
  } catch (error) {
    client.disconnect();
    const reason = (socketError ?? error).message;
    throw new RedisUnreachableError(`Redis unreachable at ${redisUrl}: ${reason}`);
  }
  return client;
}

function platformJobOptions(options) {
  return {
    jobId: required(options, 'job-id'),
    attempts: nonNegativeInteger(options, 'attempts'),
    backoff: { type: 'exponential', delay: nonNegativeInteger(options, 'backoff-ms') },
    removeOnComplete: REMOVE_ON_COMPLETE,
    removeOnFail: REMOVE_ON_FAIL,
  };
}

async function addPlatformJob(queue, options) {
  const name = required(options, 'name');
  const data = jsonOption(options, 'data');
  const job = await queue.add(name, data, platformJobOptions(options));
  return job.id;
}

function describeJob(job, state) {
  return {
    jobId: job.id,
    state,
    name: job.name,
    data: job.data,
    opts: job.opts,
    returnvalue: job.returnvalue ?? null,
    failedReason: job.failedReason ?? null,
    attemptsMade: job.attemptsMade,
    attemptsStarted: job.attemptsStarted,
    stacktrace: job.stacktrace ?? [],
    progress: job.progress,
    timestamp: job.timestamp,
    processedOn: job.processedOn ?? null,
    finishedOn: job.finishedOn ?? null,
  };
}

// A job deleted by its retention (or never added) reads back as `removed`.
async function readJob(bullmq, queue, jobId) {
  const job = await bullmq.Job.fromId(queue, jobId);
  if (job === undefined) {
    return { jobId, state: 'removed' };
  }
  return describeJob(job, await job.getState());
}

// The id of the newest entry of the queue's event stream, or 0-0 when it has none.
async function lastEventId(probe, options, queueName) {
  const streamKey = `${options.prefix}:${queueName}:events`;
  const newest = await probe.xrevrange(streamKey, '+', '-', 'COUNT', 1);
  return newest.length > 0 ? newest[0][0] : '0-0';
}

// Records, in stream order, every event QueueEvents emits for one job. BullMQ
// emits each event twice (`name` and `name:jobId`); only the plain name is kept.
function recordJobEvents(queueEvents, jobId) {
  const seen = { names: [], progress: [], terminal: null };
  let settle;
  seen.finished = new Promise((resolve) => {
    settle = resolve;
  });
  const emit = queueEvents.emit.bind(queueEvents);
  queueEvents.emit = (event, ...args) => {
    const payload = args[0];
    if (!event.includes(':') && payload?.jobId === jobId) {
      noteEvent(seen, event, payload, settle);
    }
    return emit(event, ...args);
  };
  return seen;
}

function noteEvent(seen, event, payload, settle) {
  seen.names.push(event);
  if (event === 'progress') {
    seen.progress.push(payload.data);
  }
  if ((event === 'completed' || event === 'failed') && seen.terminal === null) {
    seen.terminal = { event, payload };
    settle();
  }
}

function timeoutAfter(timeoutMs) {
  let timer;
  const promise = new Promise((resolve) => {
    timer = setTimeout(resolve, timeoutMs);
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

async function commandAdd(context) {
  const jobId = await addPlatformJob(context.queue, context.options);
  return { jobId };
}

// Reading the stream from the id current before the add (rather than from `$`
// once the XREAD reaches Redis) means a fast worker cannot finish the job
// before the listener starts and leave `run` waiting for an event already gone.
async function commandRun(context) {
  const { bullmq, options, queue, probe, connection } = context;
  const jobId = required(options, 'job-id');
  const timeoutMs = nonNegativeInteger(options, 'timeout-ms');
  const queueEvents = new bullmq.QueueEvents(queue.name, {
    connection,
    prefix: options.prefix,
    lastEventId: await lastEventId(probe, options, queue.name),
  });
  context.closables.push(queueEvents);
  const seen = recordJobEvents(queueEvents, jobId);
  await queueEvents.waitUntilReady();

  await addPlatformJob(queue, options);
  const timeout = timeoutAfter(timeoutMs);
  await Promise.race([seen.finished, timeout.promise]);
  timeout.cancel();

  return runOutcome(await readJob(bullmq, queue, jobId), seen);
}

// The job as read back wins; the terminal event's payload stands in once the
// job has been removed by its retention.
function runOutcome(job, seen) {
  const payload = seen.terminal?.payload ?? {};
  return {
    jobId: job.jobId,
    event: seen.terminal?.event ?? 'timeout',
    state: job.state,
    returnvalue: job.returnvalue ?? payload.returnvalue ?? null,
    failedReason: job.failedReason ?? payload.failedReason ?? null,
    attemptsMade: job.attemptsMade ?? null,
    progressEvents: seen.progress,
    events: seen.names,
  };
}

async function commandInspect(context) {
  const jobId = required(context.options, 'job-id');
  return readJob(context.bullmq, context.queue, jobId);
}

async function commandCounts(context) {
  return context.queue.getJobCounts();
}

async function commandObliterate(context) {
  await context.queue.obliterate({ force: true });
  return { obliterated: context.queue.name };
}

const COMMANDS = {
  add: commandAdd,
  run: commandRun,
  inspect: commandInspect,
  counts: commandCounts,
  obliterate: commandObliterate,
};

// Commands that only read must not rewrite the queue's meta hash (library name
// and version) that the producer or the worker under test wrote.
const READ_ONLY_COMMANDS = new Set(['inspect', 'counts', 'obliterate']);

async function closeAll(closables) {
  for (const closable of closables.reverse()) {
    await closable.close();
  }
}

async function main(argv) {
  const { command, options } = parseCommandLine(argv);
  const handler = COMMANDS[command];
  if (handler === undefined) {
    throw new UsageError(`unknown command ${command}`);
  }
  const queueName = required(options, 'queue');
  const bullmq = await loadBullmq(options);
  const probe = await connectProbe(options['redis-url']);

  const closables = [{ close: () => probe.quit() }];
  const connection = { url: options['redis-url'] };
  const context = { bullmq, options, probe, connection, closables };
  try {
    context.queue = new bullmq.Queue(queueName, {
      connection,
      prefix: options.prefix,
      skipMetasUpdate: READ_ONLY_COMMANDS.has(command),
    });
    closables.push(context.queue);
    const result = await handler(context);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await closeAll(closables);
  }
}

main(process.argv.slice(2)).catch((error) => {
  if (error instanceof UsageError) {
    process.stderr.write(`bullmq-client: ${error.message}\n${USAGE}\n`);
    process.exitCode = 2;
  } else if (error instanceof RedisUnreachableError) {
    process.stderr.write(`bullmq-client: ${error.message}\n`);
    process.exitCode = 3;
  } else {
    process.stderr.write(`bullmq-client: ${error.stack ?? error}\n`);
    process.exitCode = 1;
  }
});
