#!/usr/bin/env python3
"""report.py - summarise herald-bench JSON results: medians per scenario and server, a Markdown
table with herald's ratio to each peer, a summary JSON and an SVG chart. Standard library only.

usage: report.py RESULTS_DIR [--svg FILE] [--json FILE] [--markdown FILE]
RESULTS_DIR holds <scenario>__<server>__<run>.json files written by herald-bench --json.
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

SCENARIO_ORDER = ["latency", "throughput", "scale", "large", "channels"]
SERVER_ORDER = ["herald", "nchan", "ws"]
COLORS = {"herald": "#d9480f", "nchan": "#1971c2", "ws": "#2f9e44"}


def load(results_dir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*__*__*.json"))):
        scenario, server, _ = os.path.basename(path)[:-5].split("__")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"report: skipping {path}: {e}", file=sys.stderr)
            continue
        runs.setdefault((scenario, server), []).append(data)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def metrics(run):
    server = run.get("server") or {}
    lat = run.get("latency_us") or {}
    return {
        "deliveries_per_s": run.get("deliveries_per_s"),
        "publish_per_s": run.get("publish_per_s"),
        "mb_per_s": run.get("mb_per_s"),
        "p50_us": lat.get("p50"),
        "p99_us": lat.get("p99"),
        "p999_us": lat.get("p999"),
        "max_us": lat.get("max"),
        "rss_per_conn_bytes": server.get("rss_per_connection_bytes"),
        "rss_subscribed_kb": server.get("rss_subscribed_kb"),
        "server_cpu_pct": server.get("cpu_pct"),
        "loadgen_cpu_pct": run.get("loadgen_cpu_pct"),
        "losses": run.get("losses"),
        "duplicates": run.get("duplicates"),
        "reorders": run.get("reorders"),
        "subscribers_ready": run.get("subscribers_ready"),
        "subscribers_failed": run.get("subscribers_failed"),
        "subscribers_closed": run.get("subscribers_closed"),
    }


def summarise(runs):
    summary = {}
    for (scenario, server), rs in runs.items():
        per = [metrics(r) for r in rs]
        med = {k: median([p[k] for p in per]) for k in per[0]}
        # Problems are summed, not medianed: one lossy run is worth seeing.
        for k in ("losses", "duplicates", "reorders", "subscribers_failed", "subscribers_closed"):
            med[k] = sum((p[k] or 0) for p in per)
        med["runs"] = len(rs)
        med["errors"] = sorted({r.get("first_error") or r.get("publish_error") for r in rs} - {"", None})
        summary.setdefault(scenario, {})[server] = med
    return summary


def ordered(keys, order):
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def fmt_num(v, unit=""):
    if v is None:
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M{unit}"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k{unit}"
    if abs(v) >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.1f}{unit}"


def fmt_us(v):
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f} ms"
    return f"{v:.0f} us"


def fmt_bytes(v):
    if v is None or v <= 0:
        return "-"
    if v >= 1024:
        return f"{v / 1024:.1f} KiB"
    return f"{v:.0f} B"


def ratio(a, b):
    if a is None or b is None or b == 0 or a == 0:
        return "-"
    return f"{a / b:.2f}x"


def markdown(summary):
    out = []
    out.append("| scenario | server | deliveries/s | MB/s | p50 | p99 | p99.9 | RSS/conn | server CPU | losses | runs |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sc in ordered(summary.keys(), SCENARIO_ORDER):
        for sv in ordered(summary[sc].keys(), SERVER_ORDER):
            m = summary[sc][sv]
            losses = m["losses"] + m["duplicates"]
            bad = "" if not (m["subscribers_failed"] or m["subscribers_closed"]) else " (!)"
            out.append(
                f"| {sc} | {sv}{bad} | {fmt_num(m['deliveries_per_s'])} | {fmt_num(m['mb_per_s'])} | "
                f"{fmt_us(m['p50_us'])} | {fmt_us(m['p99_us'])} | {fmt_us(m['p999_us'])} | "
                f"{fmt_bytes(m['rss_per_conn_bytes'])} | {fmt_num(m['server_cpu_pct'], '%')} | "
                f"{losses} | {m['runs']} |")
    peers = sorted({sv for sc in summary.values() for sv in sc} - {"herald"},
                   key=lambda s: (SERVER_ORDER.index(s) if s in SERVER_ORDER else 99, s))
    if any("herald" in summary[sc] for sc in summary) and peers:
        out.append("")
        out.append("herald / peer (medians): deliveries/s and MB/s above 1x favour herald; "
                   "p99 and RSS/conn below 1x favour herald.")
        out.append("")
        out.append("| scenario | peer | deliveries/s | MB/s | p99 latency | RSS/conn |")
        out.append("|---|---|---:|---:|---:|---:|")
        for sc in ordered(summary.keys(), SCENARIO_ORDER):
            h = summary[sc].get("herald")
            if not h:
                continue
            for p in peers:
                m = summary[sc].get(p)
                if not m:
                    continue
                out.append(
                    f"| {sc} | {p} | {ratio(h['deliveries_per_s'], m['deliveries_per_s'])} | "
                    f"{ratio(h['mb_per_s'], m['mb_per_s'])} | {ratio(h['p99_us'], m['p99_us'])} | "
                    f"{ratio(h['rss_per_conn_bytes'], m['rss_per_conn_bytes'])} |")
    notes = []
    for sc in ordered(summary.keys(), SCENARIO_ORDER):
        for sv in ordered(summary[sc].keys(), SERVER_ORDER):
            m = summary[sc][sv]
            if m["losses"] or m["duplicates"] or m["subscribers_failed"] or m["subscribers_closed"]:
                notes.append(f"- {sc}/{sv}: losses {m['losses']}, duplicates {m['duplicates']}, "
                             f"subscribers failed {m['subscribers_failed']}, closed by the server "
                             f"{m['subscribers_closed']}" + (f"; {m['errors'][0]}" if m["errors"] else ""))
    if notes:
        out.append("")
        out.append("Problems (summed over runs):")
        out.extend(notes)
    return "\n".join(out) + "\n"


def nice_max(v):
    if not v or v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg(summary):
    scenarios = ordered(summary.keys(), SCENARIO_ORDER)
    servers = ordered({sv for sc in summary.values() for sv in sc}, SERVER_ORDER)
    panels = [("deliveries_per_s", "deliveries/s (higher is better)", fmt_num),
              ("p99_us", "p99 latency (lower is better)", fmt_us)]
    pw, ph, left, top, gap = 360, 150, 150, 70, 80
    width = left + len(panels) * (pw + gap) + 20
    height = top + len(scenarios) * (ph + gap) + 20
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         '<text x="10" y="22" font-size="16" font-weight="bold">herald fan-out benchmark (medians)</text>']
    x = 10
    for sv in servers:
        o.append(f'<rect x="{x}" y="34" width="12" height="12" fill="{COLORS.get(sv, "#868e96")}"/>'
                 f'<text x="{x + 16}" y="45">{esc(sv)}</text>')
        x += 16 + 8 * len(sv) + 20
    for i, (key, title, fmt) in enumerate(panels):
        px = left + i * (pw + gap)
        o.append(f'<text x="{px + pw / 2}" y="{top - 8}" text-anchor="middle" font-weight="bold">{esc(title)}</text>')
    for r, sc in enumerate(scenarios):
        py = top + r * (ph + gap)
        o.append(f'<text x="10" y="{py + ph / 2}" font-weight="bold">{esc(sc)}</text>')
        for i, (key, title, fmt) in enumerate(panels):
            px = left + i * (pw + gap)
            vals = [summary[sc].get(sv, {}).get(key) for sv in servers]
            vmax = nice_max(max([v for v in vals if v] or [0]))
            o.append(f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="#f8f9fa" stroke="#dee2e6"/>')
            for t in range(1, 5):
                gy = py + ph - ph * t / 4
                o.append(f'<line x1="{px}" y1="{gy:.1f}" x2="{px + pw}" y2="{gy:.1f}" stroke="#e9ecef"/>')
            o.append(f'<text x="{px - 4}" y="{py + 10}" text-anchor="end" font-size="10" fill="#495057">{esc(fmt(vmax))}</text>')
            n = max(len(servers), 1)
            slot = pw / n
            bw = slot * 0.6
            for j, (sv, v) in enumerate(zip(servers, vals)):
                bx = px + j * slot + (slot - bw) / 2
                if v is None:
                    o.append(f'<text x="{bx + bw / 2:.1f}" y="{py + ph - 4}" text-anchor="middle" fill="#868e96">n/a</text>')
                    continue
                bh = ph * 0.88 * v / vmax if vmax else 0
                o.append(f'<rect x="{bx:.1f}" y="{py + ph - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                         f'fill="{COLORS.get(sv, "#868e96")}"><title>{esc(sv)}: {esc(fmt(v))}</title></rect>')
                o.append(f'<text x="{bx + bw / 2:.1f}" y="{py + ph - bh - 4:.1f}" text-anchor="middle" font-size="11">{esc(fmt(v))}</text>')
                o.append(f'<text x="{bx + bw / 2:.1f}" y="{py + ph + 14}" text-anchor="middle" font-size="11">{esc(sv)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results_dir")
    ap.add_argument("--svg")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    runs = load(a.results_dir)
    if not runs:
        print(f"report: no results in {a.results_dir}", file=sys.stderr)
        return 1
    summary = summarise(runs)
    md = markdown(summary)
    sys.stdout.write(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"medians": summary}, f, indent=2, sort_keys=True)
            f.write("\n")
    if a.svg:
        with open(a.svg, "w") as f:
            f.write(svg(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
