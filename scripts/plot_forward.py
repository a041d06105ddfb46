#!/usr/bin/env python3
"""Plots the forward-pass cost curves of `heterospec bench forward --json`
(read from stdin) to the PNG named by the first argument.

Needs matplotlib (`pip install matplotlib`).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    out = sys.argv[1]
    report = json.load(sys.stdin)
    series = {f"heterospec {report['weight_format']}": report["heterospec"]}
    for name, r in report.get("variants", {}).items():
        series[f"heterospec {name}"] = r
    if report.get("llama_cpp"):
        series["llama.cpp"] = report["llama_cpp"]
    fig, (ax_ms, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in series.items():
        ts = sorted(int(t) for t in r["forward_ms"])
        ms = [r["forward_ms"][str(t)] for t in ts]
        ax_ms.plot(ts, ms, marker="o", label=name)
        ax_ratio.plot(ts, [m / ms[0] for m in ms], marker="o", label=name)
    for ax in (ax_ms, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("new tokens per forward (T), after a 256-token context")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("ms per forward")
    ax_ratio.set_ylabel("cost relative to T=1")
    ax_ratio.plot([1, 64], [1, 64], linestyle=":", color="gray")
    fig.suptitle(f"Forward cost, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
