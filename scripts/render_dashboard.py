"""Draw the Grafana dashboard's panels (deploy/grafana/orderbook-collector.json) from a
Prometheus server, with matplotlib: the same PromQL, queried over the last minutes, one
subplot a panel, for one market. Where Grafana does not run (this project's machines),
this is how its picture is made (docs/img/dashboard.png).

    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --market spot --minutes 10 --out docs/img/dashboard.png
"""
from __future__ import annotations

import argparse
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "orderbook-collector.json"


def query_range(api: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{api}/api/v1/query_range?{q}", timeout=30) as r:
        return json.loads(r.read())["data"]["result"]


def legend(template: str, labels: dict) -> str:
    out = template
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True)
    p.add_argument("--market", default="spot")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    board = json.loads(BOARD.read_text())
    panels = [x for x in board["panels"] if x["type"] != "row"]
    end = time.time()
    start = end - 60 * args.minutes
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.1 * rows), constrained_layout=True, squeeze=False)
    fig.suptitle(f"{board['title']}: market {args.market}, the last {args.minutes:g} minutes "
                 "(the dashboard's queries, drawn with matplotlib)")
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$market", args.market)
            for series in query_range(args.prometheus, expr, start, end, 5):
                t = [(float(ts) - end) / 60 for ts, _ in series["values"]]
                v = [float(x) for _, x in series["values"]]
                ax.plot(t, v, label=legend(target["legendFormat"], series["metric"]), linewidth=1.2)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("minutes before now", fontsize=8)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if unit not in ("short",):
            ax.set_ylabel(unit, fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=70)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
