#!/usr/bin/env python3
"""Draws BENCHMARKS.md's charts from `cargo bench --bench pipeline -- --json FILE`
output files.

    python3 benches/charts.py --out benches/charts benches/results/*.json

Writes, into --out:

* throughput.svg — per broker, the median msg/s of the raw rdkafka pipe (all
  rounds of all the files for that broker) beside conveyor in each ordering
  mode, each bar labelled with its median ratio to the raw pipe of its own
  run;
* latency_cdf.svg — for each latency-mode file, the distribution of
  submitted → result received, raw pipe and conveyor at each offered rate.

Needs matplotlib (python3 -m pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from collections import defaultdict
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def broker_name(run: Dict[str, Any]) -> str:
    text = run["broker"]
    return "mock cluster" if "mock" in text else "nisshi" if "127.0.0.1" in text else text


def mode_name(run: Dict[str, Any]) -> str:
    if run["ordering"] == "key" and run.get("keys"):
        return f"key ({run['keys']:,} keys)"
    return run["ordering"]


def throughput(runs: List[Dict[str, Any]], out: pathlib.Path) -> None:
    raw: Dict[str, List[float]] = defaultdict(list)
    modes: Dict[str, Dict[str, Any]] = defaultdict(dict)
    for run in runs:
        rounds = [r for r in run["results"] if r["kind"] == "throughput"]
        if not rounds:
            continue
        broker = broker_name(run)
        raw[broker] += [r["raw_msgs_per_s"] for r in rounds]
        modes[broker][mode_name(run)] = {
            "rate": statistics.median(r["conveyor_msgs_per_s"] for r in rounds),
            "ratio": statistics.median(
                r["conveyor_msgs_per_s"] / r["raw_msgs_per_s"] for r in rounds
            ),
        }
    if not raw:
        return
    brokers = sorted(raw)
    names = ["raw rdkafka pipe"] + sorted({m for b in brokers for m in modes[b]})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, heights, labels = [], [], []
        for j, broker in enumerate(brokers):
            if name == "raw rdkafka pipe":
                value, label = statistics.median(raw[broker]), "1.00"
            elif name in modes[broker]:
                value = modes[broker][name]["rate"]
                label = f"{modes[broker][name]['ratio']:.2f}"
            else:
                continue
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            heights.append(value / 1000)
            labels.append(label)
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=labels, fontsize=8)
    ax.set_xticks(range(len(brokers)), brokers)
    ax.set_ylabel("thousand messages / s (median)")
    # Sizes of the throughput runs only (latency and waiting runs carry
    # the default --messages, which they do not use).
    measured = [
        r for r in runs if any(x["kind"] == "throughput" for x in r["results"])
    ]
    sizes = ", ".join(sorted({f"{broker_name(r)} {r['messages']:,}" for r in measured}))
    first = measured[0] if measured else runs[0]
    ax.set_title(
        f"echo pipeline, {first['payload']} B payloads over {first['partitions']} partitions "
        f"({sizes} messages)\nbar labels: median ratio to the raw pipe",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.svg")
    plt.close(fig)


def latency(runs: List[Dict[str, Any]], out: pathlib.Path) -> None:
    by_broker: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for run in runs:
        for r in run["results"]:
            if r["kind"] == "latency":
                by_broker[broker_name(run)].append(r)
    if not by_broker:
        return
    brokers = sorted(by_broker)
    fig, axes = plt.subplots(1, len(brokers), figsize=(5 * len(brokers), 4.2), squeeze=False)
    rates = sorted({r["rate"] for rs in by_broker.values() for r in rs})
    colours = {rate: f"C{i}" for i, rate in enumerate(rates)}
    for ax, broker in zip(axes[0], brokers):
        for r in sorted(by_broker[broker], key=lambda r: (r["rate"], r["pipe"])):
            values = r["latency_ms_by_permille"]
            fractions = [i / (len(values) - 1) for i in range(len(values))]
            ax.plot(
                [max(v, 0.01) for v in values],
                fractions,
                "--" if r["pipe"] == "raw" else "-",
                color=colours[r["rate"]],
                label=f"{'raw pipe' if r['pipe'] == 'raw' else 'conveyor'}, {r['rate']:,}/s",
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("submitted → result received (ms, log scale)")
        ax.set_title(broker, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of tasks (CDF)")
    fig.suptitle("latency at open-loop offered rates: conveyor (solid) and the raw pipe (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.svg")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=pathlib.Path, help="--json outputs of the bench")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benches/charts"))
    args = parser.parse_args()
    runs = [json.loads(f.read_text()) for f in args.files]
    args.out.mkdir(parents=True, exist_ok=True)
    throughput(runs, args.out)
    latency(runs, args.out)
    for chart in sorted(args.out.glob("*.svg")):
        print(chart)


if __name__ == "__main__":
    main()
