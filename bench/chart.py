"""Draw bench/chart.png from bench/results.json: jobs/s and worker-added time per job
against concurrency, at zero and at the realistic latency.

    python -m bench.chart [--results bench/results.json] [--output bench/chart.png]

Needs matplotlib (`pip install matplotlib`; neither the worker nor its tests use it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).parent
STYLES = {"zero": ("tab:blue", "o"), "realistic": ("tab:orange", "s")}


def draw(results: dict[str, Any], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (rate, added) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for latency, (color, marker) in STYLES.items():
        phases = sorted(
            (s for s in results["chat"] if s["latency"] == latency and s["processes"] == 1),
            key=lambda s: s["concurrency"],
        )
        if not phases:
            continue
        concurrency = [s["concurrency"] for s in phases]
        rate.plot(
            concurrency,
            [s["jobs_per_s"] for s in phases],
            marker=marker,
            color=color,
            label=f"{latency} latency: measured",
        )
        if latency == "realistic":
            rate.plot(
                concurrency,
                [s["ideal_jobs_per_s"] for s in phases],
                linestyle="--",
                color=color,
                label="realistic latency: ideal (concurrency / reply time)",
            )
        added.plot(
            concurrency,
            [s["worker_added_p50_ms"] for s in phases],
            marker=marker,
            color=color,
            label=f"{latency}: p50",
        )
        added.plot(
            concurrency,
            [s["worker_added_p99_ms"] for s in phases],
            marker=marker,
            color=color,
            linestyle=":",
            label=f"{latency}: p99",
        )

    rate.set(
        xscale="log",
        yscale="log",
        xlabel="concurrency (jobs in flight)",
        ylabel="ai-chat jobs/s",
        title="Throughput",
    )
    added.set(
        xscale="log",
        yscale="log",
        xlabel="concurrency (jobs in flight)",
        ylabel="ms per job",
        title="Worker-added time per job",
    )
    for axes in (rate, added):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    machine = results["machine"]
    figure.suptitle(
        f"uvian-worker, one process, {machine['nproc']} cores ({machine['cpu']}), "
        f"{results['date'][:10]}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--output", type=Path, default=HERE / "chart.png")
    args = parser.parse_args()
    draw(orjson.loads(args.results.read_bytes()), args.output)
    print(f"chart written to {args.output}")


if __name__ == "__main__":
    main()
