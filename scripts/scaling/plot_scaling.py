"""Draw the scaling figure from a scaling JSON (scripts/scaling/run.py's output) into a PNG.

    python scripts/scaling/plot_scaling.py docs/scaling.json -o docs/scaling.png

Left: measured vs predicted step time at 2 hosts on the shaped link, each configuration, with the
+-15% target band. Right: predicted step time against hosts (8-64) for 1, 10 and 100 Gbit/s links, each
model, with the communication-free time for reference. Needs matplotlib; without it, says how to install
it and exits with status 1 (nothing else depends on the plot).
"""

from __future__ import annotations

import argparse
import json
import sys

TARGET = 0.15
LINE_STYLES = {1: "-", 10: "--", 100: ":"}


def main(argv=None) -> int:
    """Read the JSON, draw both panels, write the PNG; 1 (with a message) when matplotlib is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="scaling JSON with an 'analysis' section")
    parser.add_argument("-o", "--output", default="docs/scaling.png")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_scaling: matplotlib is not installed, so no PNG was drawn; install it with "
              "`pip install matplotlib` and run this again (the numbers are in the JSON)", file=sys.stderr)
        return 1
    with open(args.json) as handle:
        data = json.load(handle)
    analysis = data["analysis"]

    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 5.4), gridspec_kw={"width_ratios": [1, 1.1]})
    comparison = analysis["comparison"]
    labels = [f"{c['model'].split(' 784')[0]}\n{c['config']} {c['impl']}" for c in comparison]
    xs = range(len(comparison))
    measured = [c["measured_step_s"] * 1e3 for c in comparison]
    predicted = [c["predicted_step_s"] * 1e3 for c in comparison]
    left.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured", color="tab:blue")
    left.bar([x + 0.2 for x in xs], predicted, width=0.4, label="predicted (alpha-beta)", color="tab:orange",
             yerr=[[p * TARGET for p in predicted], [p * TARGET for p in predicted]], capsize=3)
    for x, c in zip(xs, comparison):
        left.annotate(f"{c['step_error'] * 100:+.0f}%", (x + 0.2, c["predicted_step_s"] * 1e3 * (1 + TARGET)),
                      ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(xs), labels, fontsize=7)
    left.set_ylabel("step time (ms)")
    left.set_title(f"2 fake hosts, links shaped to {data['link']['rate']}: step time\n"
                   f"(error bars: +-{TARGET:.0%} of predicted)", fontsize=10)
    left.legend(fontsize=8)

    colors = {}
    for index, (model, rows) in enumerate(analysis["prediction"].items()):
        color = colors.setdefault(model, f"C{index}")
        for gbit, style in LINE_STYLES.items():
            mine = [r for r in rows if r["gbit_s"] == gbit]
            right.plot([r["hosts"] for r in mine], [r["step_s"] * 1e3 for r in mine], style, color=color,
                       marker="o", markersize=3, label=f"{model.split(' 784')[0]}, {gbit} Gbit/s")
        right.plot([r["hosts"] for r in rows if r["gbit_s"] == 1], [r["compute_s"] * 1e3 for r in rows
                                                                     if r["gbit_s"] == 1],
                   "-.", color=color, alpha=0.4, label=f"{model.split(' 784')[0]}, no communication")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks([8, 16, 32, 64], ["8", "16", "32", "64"])
    right.set_xlabel("hosts (1 rank each; per-rank batch as measured)")
    right.set_ylabel("predicted step time (ms)")
    right.set_title("Predicted: ring reduce-scatter + allgather,\nfitted alpha, beta scaled to the link", fontsize=10)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    right.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
