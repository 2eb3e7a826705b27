"""Prints criterion's results (target/criterion) as a markdown table of medians."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
print("| benchmark | median | 95% interval of the mean |")
print("|---|---|---|")


def fmt(ns):
    return f"{ns / 1000:.1f} µs" if ns < 1e6 else f"{ns / 1e6:.2f} ms"


for bench in sorted(root.glob("*/*/new/benchmark.json")):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    mean = est["mean"]["confidence_interval"]
    print(f"| {meta['full_id']} | {fmt(est['median']['point_estimate'])} "
          f"| {fmt(mean['lower_bound'])} – {fmt(mean['upper_bound'])} |")
