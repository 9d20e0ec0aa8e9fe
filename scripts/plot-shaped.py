#!/usr/bin/env python3
"""Table and plot of scripts/shaped-bench.sh's results: OUT/<rate>/bench.json (+ links.txt).

  plot-shaped.py OUT      writes OUT/shaped.md (markdown table) and OUT/shaped.svg (bars: median round
                          of fullmesh, hierarchy and the MPI_Alltoallv pipeline per link rate and token
                          count, the link floor of each as a black tick); prints the table.
The SVG is written by hand (no plotting library needed).
"""
import json
import re
import sys
from pathlib import Path

SERIES = [("fullmesh", "#1f77b4"), ("hierarchy", "#2ca02c"), ("MPI_Alltoallv", "#d62728")]


def rate_key(name: str) -> float:
    """Unshaped first, then the fastest links first."""
    m = re.match(r"([0-9.]+)(g|m)bit", name)
    if not m:
        return -1e9
    return -float(m.group(1)) * (1000 if m.group(2) == "g" else 1)


def load(out: Path):
    runs = []
    for d in sorted((p for p in out.iterdir() if (p / "bench.json").exists()), key=lambda p: rate_key(p.name)):
        rows = json.loads((d / "bench.json").read_text())
        info = (d / "links.txt").read_text() if (d / "links.txt").exists() else ""
        one = re.search(r"one direction:\n.*TCP round trip median (\d+) us.*?: ([0-9.]+) Gbit/s \(sender", info)
        both = re.findall(r"host \d -> \d: .*?: ([0-9.]+) Gbit/s \(sender", info.split("both directions at once:")[-1])
        probe = (one.group(1), one.group(2), "+".join(both)) if one else None
        loads = re.findall(r"load average: ([0-9.]+)", info)
        runs.append((d.name, rows, probe, loads))
    return runs


def entries(rows):
    """(tokens, series) -> dict(round, p10, p90, inter, busiest, floor, ratio) for one run."""
    got = {}
    for r in rows:
        m, b = r["moedist"], r["mpi_alltoallv"]
        for name, side in ((r["comm_alg"], m), ("MPI_Alltoallv", b)):
            got[(r["tokens"], name)] = {
                "round": side["round_us"]["median"], "p10": side["round_us"]["p10"], "p90": side["round_us"]["p90"],
                "inter": side.get("bytes_inter_host_per_round", 0), "busiest": side.get("busiest_host_link_bytes_per_round", 0),
                "floor": side.get("link_floor_us"), "ratio": side.get("round_over_link_floor"),
                "check": r.get("outputs_vs_baseline", "")}
    return got


def table(runs) -> str:
    lines = ["| link | raw TCP Gbit/s: one way (both ways at once), RTT us | tokens/rank | exchange | round ms (p10-p90) | bytes across hosts / round "
             "| busiest host link bytes / round | link floor ms | round / floor | hierarchy vs fullmesh |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows, probe, _ in runs:
        got = entries(rows)
        raw = f"{probe[1]} ({probe[2]}), {probe[0]}" if probe else "-"
        for tokens in sorted({t for t, _ in got}):
            fm, hi = got.get((tokens, "fullmesh")), got.get((tokens, "hierarchy"))
            for series, _ in SERIES:
                e = got.get((tokens, series))
                if e is None:
                    continue
                floor = f"{e['floor'] / 1e3:.2f}" if e["floor"] is not None else "-"
                ratio = f"{e['ratio']:.2f}x" if e["ratio"] is not None else "-"
                speed = f"{fm['round'] / hi['round']:.2f}x" if series == "hierarchy" and fm and hi else ""
                lines.append(f"| {name} | {raw} | {tokens} | {series} | {e['round'] / 1e3:.2f} ({e['p10'] / 1e3:.2f}-{e['p90'] / 1e3:.2f}) "
                             f"| {e['inter']:,.0f} | {e['busiest']:,.0f} | {floor} | {ratio} | {speed} |")
    loads = "; ".join(f"{name}: {' / '.join(l)}" for name, _, _, l in runs if l)
    return "\n".join(lines) + "\n\nLoad average (1 min) before / after each rate's runs: " + loads + "\n"


def svg(runs) -> str:
    tokens_all = sorted({t for _, rows, _, _ in runs for t in (r["tokens"] for r in rows)})
    panel_w, panel_h, left, top, bottom = 460, 320, 70, 40, 60
    width = left + len(tokens_all) * (panel_w + 30) + 10
    height = top + panel_h + bottom + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for pi, tokens in enumerate(tokens_all):
        x0 = left + pi * (panel_w + 30)
        groups = [(name, entries(rows)) for name, rows, _, _ in runs]
        vmax = max((e["round"] for _, g in groups for (t, _), e in g.items() if t == tokens), default=1.0)
        vmax = max(vmax, max((e["floor"] or 0 for _, g in groups for (t, _), e in g.items() if t == tokens), default=0))
        step = next(m * 10 ** e for e in range(-2, 6) for m in (1, 2, 5) if vmax / 1e3 / (m * 10 ** e) <= 8)
        ticks = [i * step for i in range(int(vmax / 1e3 / step) + 2)]
        ymax = ticks[-1] * 1e3
        y = lambda v: top + panel_h - panel_h * v / ymax  # noqa: E731
        out.append(f'<text x="{x0 + panel_w / 2}" y="{top - 18}" text-anchor="middle" font-size="14">'
                   f'{tokens} tokens/rank, 2 hosts x 4 ranks, H 7168, K 8, E 64, bf16</text>')
        for t in ticks:
            out.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{y(t * 1e3):.1f}" y2="{y(t * 1e3):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 6}" y="{y(t * 1e3) + 4:.1f}" text-anchor="end">{t:g}</text>')
        out.append(f'<text transform="translate({x0 - 48},{top + panel_h / 2}) rotate(-90)" text-anchor="middle">'
                   'round (dispatch + combine), median ms</text>')
        gw = panel_w / max(1, len(groups))
        bw = gw * 0.8 / len(SERIES)
        for gi, (name, g) in enumerate(groups):
            gx = x0 + gi * gw + gw * 0.1
            for si, (series, color) in enumerate(SERIES):
                e = g.get((tokens, series))
                if e is None:
                    continue
                bx = gx + si * bw
                out.append(f'<rect x="{bx:.1f}" y="{y(e["round"]):.1f}" width="{bw - 2:.1f}" height="{top + panel_h - y(e["round"]):.1f}" '
                           f'fill="{color}"><title>{series} {name}: {e["round"] / 1e3:.2f} ms</title></rect>')
                if e["floor"]:
                    out.append(f'<line x1="{bx - 1:.1f}" x2="{bx + bw - 1:.1f}" y1="{y(e["floor"]):.1f}" y2="{y(e["floor"]):.1f}" '
                               'stroke="black" stroke-width="2.5"/>')
            out.append(f'<text x="{x0 + gi * gw + gw / 2:.1f}" y="{top + panel_h + 18}" text-anchor="middle">'
                       f'{"unshaped" if name == "off" else name.replace("gbit", " Gbit/s")}</text>')
        out.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{top + panel_h}" y2="{top + panel_h}" stroke="black"/>')
    lx = left
    ly = top + panel_h + 42
    for series, color in SERIES:
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{color}"/><text x="{lx + 16}" y="{ly}">{series}</text>')
        lx += 130
    out.append(f'<line x1="{lx}" x2="{lx + 14}" y1="{ly - 4}" y2="{ly - 4}" stroke="black" stroke-width="2.5"/>'
               f'<text x="{lx + 18}" y="{ly}">link floor (busiest host link bytes / rate)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    runs = load(out)
    if not runs:
        print(f"plot-shaped: no <rate>/bench.json under {out}", file=sys.stderr)
        return 1
    md = table(runs)
    (out / "shaped.md").write_text(md)
    (out / "shaped.svg").write_text(svg(runs))
    print(md)
    print(f"plot: {out / 'shaped.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
