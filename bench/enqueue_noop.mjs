#!/usr/bin/env node
// Fills a queue with N no-op jobs shaped as the platform's API adds them, for
// the queue benchmark: a UUID job id, data `{jobId, input}`, the API's options.
//
// The worker's runner fails any job whose id is not a UUID or whose data has no
// `input` object, so the jobs of bench/node/enqueue.mjs (numeric ids, data
// `{seq}`) would measure the failure path. bullmq and the helpers come from
// bench/node, so both scripts run the same pinned npm packages.

import { randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import { parseOptions, printResult, queueOptions, round, runScript } from './node/common.mjs';

const require = createRequire(new URL('./node/package.json', import.meta.url));
const { Queue } = require('bullmq');

const USAGE = `usage: node enqueue_noop.mjs --queue Q --count N [--name noop] [--batch 1000]
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
    const jobId = randomUUID();
    jobs.push({ name, data: { jobId, input: { seq } }, opts: { ...JOB_OPTIONS, jobId } });
  }
  return jobs;
}

async function main(argv) {
  const options = parseOptions(argv, EXTRA_OPTIONS, ['count', 'batch']);
  const queue = new Queue(options.queue, queueOptions(options));
  try {
    await queue.waitUntilReady();
    const startedNs = process.hrtime.bigint();
    const { count, batch, name } = options;
    for (let added = 0; added < count; added += batch) {
      await queue.addBulk(batchOfJobs(name, added, Math.min(batch, count - added)));
    }
    const seconds = Number(process.hrtime.bigint() - startedNs) / 1e9;
    printResult({ jobs: count, seconds: round(seconds, 3), jobs_per_s: round(count / seconds, 1) });
  } finally {
    await queue.close();
  }
}

runScript(main, USAGE);
