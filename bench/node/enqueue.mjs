#!/usr/bin/env node
// Fills a queue with N no-op jobs, fast, for the worker benchmarks.
//
// The jobs carry the options the platform's API adds jobs with, so that a
// worker pays the same retention and retry bookkeeping as in production.

import { Queue } from 'bullmq';
import { parseOptions, printResult, queueOptions, round, runScript } from './common.mjs';

const USAGE = `usage: node enqueue.mjs --queue Q --count N [--name noop] [--batch 1000]
                         [--prefix bull] [--redis-url URL]`;

const JOB_OPTIONS = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 1000 },
  removeOnComplete: { age: 3600, count: 1000 },
  removeOnFail: { age: 86400 },
};

const EXTRA_OPTIONS = {
  count: { type: 'string' },
  name: { type: 'string', default: 'noop' },
  batch: { type: 'string', default: '1000' },
};

function batchOfJobs(name, firstSeq, size) {
  const jobs = [];
  for (let seq = firstSeq; seq < firstSeq + size; seq += 1) {
    jobs.push({ name, data: { seq }, opts: JOB_OPTIONS });
  }
  return jobs;
}

async function enqueueAll(queue, options) {
  const { count, batch, name } = options;
  for (let added = 0; added < count; added += batch) {
    await queue.addBulk(batchOfJobs(name, added, Math.min(batch, count - added)));
  }
}

async function main(argv) {
  const options = parseOptions(argv, EXTRA_OPTIONS, ['count', 'batch']);
  const queue = new Queue(options.queue, queueOptions(options));
  try {
    await queue.waitUntilReady();
    const startedNs = process.hrtime.bigint();
    await enqueueAll(queue, options);
    const seconds = Number(process.hrtime.bigint() - startedNs) / 1e9;
    printResult({
      jobs: options.count,
      seconds: round(seconds, 3),
      jobs_per_s: round(options.count / seconds, 1),
    });
  } finally {
    await queue.close();
  }
}

runScript(main, USAGE);
