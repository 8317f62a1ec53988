#!/usr/bin/env node
// A Node BullMQ worker that drains a queue of no-op jobs: the baseline the
// Python worker's throughput and CPU cost are compared with.
//
// The clock and the CPU meter start when the first job is taken and stop when
// the expected number of jobs has finished, so start-up and the wait for the
// first job are not counted.

import { Worker } from 'bullmq';
import { parseOptions, printResult, queueOptions, round, runScript } from './common.mjs';

const USAGE = `usage: node noop-worker.mjs --queue Q --expect N [--concurrency 50] [--timeout-s 600]
                             [--prefix bull] [--redis-url URL]`;

const EXTRA_OPTIONS = {
  expect: { type: 'string' },
  concurrency: { type: 'string', default: '50' },
  'timeout-s': { type: 'string', default: '600' },
};

class Meter {
  constructor() {
    this.startedNs = null;
    this.startCpu = null;
    this.completed = 0;
    this.failed = 0;
  }

  start() {
    if (this.startedNs === null) {
      this.startedNs = process.hrtime.bigint();
      this.startCpu = process.cpuUsage();
    }
  }

  finished() {
    return this.completed + this.failed;
  }

  result() {
    const jobs = this.finished();
    const elapsedNs = this.startedNs === null ? 0n : process.hrtime.bigint() - this.startedNs;
    const seconds = Number(elapsedNs) / 1e9;
    const cpu = this.startCpu === null ? { user: 0, system: 0 } : process.cpuUsage(this.startCpu);
    const cpuMs = (cpu.user + cpu.system) / 1000;
    return {
      jobs,
      seconds: round(seconds, 3),
      jobs_per_s: seconds > 0 ? round(jobs / seconds, 1) : 0,
      cpu_ms_per_job: jobs > 0 ? round(cpuMs / jobs, 4) : 0,
      failed: this.failed,
    };
  }
}

// Resolves with true once `expect` jobs have finished, or false at the timeout.
function drain(worker, meter, options) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), options['timeout-s'] * 1000);
    const onFinished = () => {
      if (meter.finished() >= options.expect) {
        clearTimeout(timer);
        resolve(true);
      }
    };
    worker.on('completed', () => {
      meter.completed += 1;
      onFinished();
    });
    // The worker reports every failed attempt; only the last one finishes the job.
    worker.on('failed', (job) => {
      if (job && job.attemptsMade < (job.opts.attempts ?? 1)) {
        return;
      }
      meter.failed += 1;
      onFinished();
    });
  });
}

async function main(argv) {
  const options = parseOptions(argv, EXTRA_OPTIONS, ['expect', 'concurrency', 'timeout-s']);
  const meter = new Meter();
  const processor = async () => {
    meter.start();
    return null;
  };
  const worker = new Worker(options.queue, processor, {
    ...queueOptions(options),
    concurrency: options.concurrency,
  });

  const drained = await drain(worker, meter, options);
  const result = meter.result();
  await worker.close();
  printResult(drained ? result : { ...result, timeout: true });
  if (!drained) {
    process.exitCode = 1;
  }
}

runScript(main, USAGE);
