"""Draws `heterospec bench spec --json` output: speedup over plain decoding
per category, one panel per concurrency level.

usage: python3 scripts/plot_spec.py REPORT.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    report = json.load(open(sys.argv[1]))
    rows = report["rows"]
    levels = sorted({r["concurrency"] for r in rows})
    # Each compared drafter's own plain run is its 1.0 line, as `plain` is the main one's.
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if not v.endswith("-plain")]
    categories = []
    for r in rows:
        if r["category"] not in categories:
            categories.append(r["category"])
    fig, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4), squeeze=False)
    width = 0.8 / len(variants)
    for ax, c in zip(axes[0], levels):
        for i, v in enumerate(variants):
            ys = []
            for cat in categories:
                match = [r for r in rows if r["concurrency"] == c and r["variant"] == v and r["category"] == cat]
                ys.append(match[0]["speedup"] if match else 0.0)
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(categories))]
            ax.bar(xs, ys, width, label=v)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=20)
        ax.set_title(f"concurrency {c}")
        ax.set_ylabel("tok/s relative to plain decoding")
    # One legend for both panels, below them (inside it would hide bars).
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(variants), 8), fontsize="small")
    fig.suptitle(f"heterospec bench spec (drafter: {report['drafter']}, {report['max_new_tokens']} tokens/request)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
