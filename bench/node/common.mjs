// Command-line and connection helpers shared by the Node benchmark scripts.

import { parseArgs } from 'node:util';

const COMMON_OPTIONS = {
  queue: { type: 'string' },
  prefix: { type: 'string', default: 'bull' },
  'redis-url': { type: 'string', default: process.env.REDIS_URL || 'redis://127.0.0.1:6379' },
};

export class UsageError extends Error {}

// Parses argv against the common options plus `extra`; every option listed in
// `integers` must be a positive integer and is returned as a number.
export function parseOptions(argv, extra, integers) {
  let values;
  try {
    ({ values } = parseArgs({ args: argv, options: { ...COMMON_OPTIONS, ...extra } }));
  } catch (error) {
    throw new UsageError(error.message);
  }
  if (!values.queue) {
    throw new UsageError('--queue is required');
  }
  for (const key of integers) {
    const number = Number(values[key]);
    if (!Number.isInteger(number) || number < 1) {
      throw new UsageError(`--${key} must be a positive integer, got ${values[key]}`);
    }
    values[key] = number;
  }
  return values;
}

export function queueOptions(options) {
  return { connection: { url: options['redis-url'] }, prefix: options.prefix };
}

export function printResult(result) {
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

// Runs `main` and maps a usage error to exit status 2 with the usage text.
export function runScript(main, usage) {
  main(process.argv.slice(2)).catch((error) => {
    if (error instanceof UsageError) {
      process.stderr.write(`${error.message}\n${usage}\n`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`${error.stack ?? error}\n`);
      process.exitCode = 1;
    }
  });
}

export function round(value, digits) {
  const scale = 10 ** digits;
  return Math.round(value * scale) / scale;
}
