"""Render the Grafana dashboard's queries on Prometheus's own graph page and
take a screenshot with headless Chromium: a view of grafana/tandem.json where
no Grafana can be had. Every panel's queries are first run through
Prometheus's query API, so a query that does not parse fails here.

    python observability/prometheus_snapshot.py --prometheus http://127.0.0.1:9090 \\
        --model SmolLM2-135M-Instruct --range 10m [--out docs/dashboard.png] [--panel TITLE ...]

One Prometheus graph page per dashboard panel (the panel's queries joined with
`or`, each tagged with its legend in a `series` label; `$model_name` and
`$__rate_interval` filled in), laid out in a grid under the panels' titles,
each frame showing the page's graph and legend.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "tandem.json"


def panel_queries(dashboard: dict, titles: list[str] | None) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(expr, legend), ...]) of each chart panel, in the dashboard's order."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            if p["type"] == "row" or (titles and p["title"] not in titles):
                continue
            out.append((p["title"], [(t["expr"], t.get("legendFormat", "")) for t in p["targets"]]))
    return out


def fill(expr: str, model: str, rate_interval: str) -> str:
    return expr.replace("$model_name", model).replace("$__rate_interval", rate_interval)


def combined(targets: list[tuple[str, str]], model: str, rate_interval: str) -> str:
    """One expression for a panel: each target tagged series=<its legend without {{...}}>."""
    if len(targets) == 1:
        return fill(targets[0][0], model, rate_interval)
    parts = []
    for expr, legend in targets:
        tag = re.sub(r"\{\{.*?\}\}", "", legend).strip() or legend
        parts.append(f'label_replace({fill(expr, model, rate_interval)}, "series", "{tag}", "", "")')
    return "\n  or ".join(parts)


def check(prometheus: str, title: str, expr: str) -> int:
    """Run the query once; the number of series it returns (exits on a query error)."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as error:  # a query Prometheus refuses: 400 with the error as JSON
        reply = json.load(error)
    if reply.get("status") != "success":
        sys.exit(f"{title}: {reply.get('error')}\n{expr}")
    return len(reply["data"]["result"])


def graph_url(prometheus: str, exprs: list[str], range_input: str) -> str:
    params = {}
    for i, expr in enumerate(exprs):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.stacked": "0",
                       f"g{i}.show_exemplars": "0", f"g{i}.range_input": range_input})
    return f"{prometheus}/graph?{urllib.parse.urlencode(params)}"


# On Prometheus 2.x's graph page (at the width of a cell) what lies above the graph: navigation, the
# expression box, its buttons, the range controls
GRAPH_TOP_PX = 445
GRAPH_HEIGHT_PX = 510  # the graph and its legend


def grid_page(cells: list[tuple[str, str]], columns: int, cell_width: int) -> str:
    """An HTML page laying out (title, graph page URL) cells: each a frame of
    Prometheus's own graph page, shifted up to show only the graph and its legend."""
    frames = "".join(
        f'<div class="cell"><h3>{html.escape(title)}</h3><div class="clip">'
        f'<iframe src="{html.escape(url)}" scrolling="no"></iframe></div></div>'
        for title, url in cells
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 8px; font-family: sans-serif; background: #fff; }}
.grid {{ display: grid; grid-template-columns: repeat({columns}, {cell_width}px); gap: 8px; }}
.cell {{ border: 1px solid #ccc; }}
h3 {{ margin: 4px 8px; font-size: 15px; }}
.clip {{ height: {GRAPH_HEIGHT_PX}px; overflow: hidden; }}
iframe {{ border: 0; width: {cell_width}px; height: {GRAPH_TOP_PX + GRAPH_HEIGHT_PX}px;
          margin-top: -{GRAPH_TOP_PX}px; }}
</style></head><body><div class="grid">{frames}</div></body></html>"""


@contextlib.contextmanager
def serving(folder: Path):
    """Serve `folder` on loopback: a page from a file:// URL is another site than
    Prometheus, and its frames of Prometheus's page (which reads its browser
    storage) then show no graph."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def screenshot(url: str, out: Path, width: int, height: int, scale: float, wait_ms: int) -> None:
    """The page in a window tall enough for every graph (a shorter one scrolls to the focused input)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--force-device-scale-factor={scale}",
                    f"--virtual-time-budget={wait_ms}",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--model", required=True, help="the served model name ($model_name)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--range", default="10m", help="the graphs' time range")
    parser.add_argument("--panel", action="append", help="a panel title to show (repeatable; default: all)")
    parser.add_argument("--out", type=Path, help="the PNG to write (without it: only run the queries)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--columns", type=int, default=2, help="graphs side by side")
    parser.add_argument("--scale", type=float, default=1.0, help="device pixels per CSS pixel")
    parser.add_argument("--wait-ms", type=int, default=15000, help="time the page gets to load its data")
    args = parser.parse_args(argv)

    panels = panel_queries(json.loads(DASHBOARD.read_text()), args.panel)
    if not panels:
        sys.exit("no panel matched")
    cells = []
    for title, targets in panels:
        for expr, _ in targets:
            check(args.prometheus, title, fill(expr, args.model, args.rate_interval))
        expr = combined(targets, args.model, args.rate_interval)
        print(f"{check(args.prometheus, title, expr):3d} series  {title}")
        cells.append((title, graph_url(args.prometheus, [expr], args.range)))
    if args.out is None:
        return
    cell_width = (args.width - 16 - 8 * (args.columns - 1)) // args.columns
    rows = -(-len(cells) // args.columns)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dashboard.html").write_text(grid_page(cells, args.columns, cell_width))
        with serving(Path(tmp)) as root:
            height = 16 + rows * (GRAPH_HEIGHT_PX + 40)
            screenshot(f"{root}/dashboard.html", args.out, args.width, height, args.scale, args.wait_ms)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
