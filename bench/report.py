#!/usr/bin/env python3
"""Turns `moedist bench` results (bench.json) into a markdown table and a latency plot."""
import json
import sys
from pathlib import Path


def main() -> int:
    rows = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    lines = [
        "| ranks | hosts | transport | comm_alg | tokens | H | K | experts | quant | comm quant | moedist dispatch us | moedist combine us "
        "| moedist round us (p10-p90) | MPI round us | speedup | moedist algbw GB/s | bytes across hosts per round: moedist "
        "| MPI | memcpy GB/s | outputs vs baseline | combine metadata check us (% of round) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, b = r["moedist"], r["mpi_alltoallv"]
        lines.append(
            f"| {r['ranks']} | {r.get('hosts', 1)} | {r.get('transport', 'shm')} | {r.get('comm_alg', 'fullmesh')} "
            f"| {r['tokens']} | {r['hidden']} | {r['topk']} | {r['experts']} | {r['quant_mode']} | {r.get('comm_quant_mode', 0)} "
            f"| {m['dispatch_us']['median']:.1f} | {m['combine_us']['median']:.1f} "
            f"| {m['round_us']['median']:.1f} ({m['round_us']['p10']:.0f}-{m['round_us']['p90']:.0f}) "
            f"| {b['round_us']['median']:.1f} | {r['speedup_round']:.2f}x | {m['algbw_GBps']:.2f} "
            f"| {m.get('bytes_inter_host_per_round', 0):.0f} | {b.get('bytes_inter_host_per_round', 0):.0f} "
            f"| {r['memcpy_GBps']:.1f} | {r.get('outputs_vs_baseline', '')} "
            f"| {m.get('metadata_check_us', 0):.2f} ({m.get('metadata_check_pct_of_round', 0):.2f}%) |"
        )
    links = [r for r in rows if r.get("hosts", 1) > 1]
    if links:  # several hosts: the busiest host link and, given --link-gbit, the floor it sets
        lines += ["", "Host links (the busiest host's larger direction; floor = its bytes / --link-gbit):", "",
                  "| ranks | hosts | comm_alg | tokens | link Gbit/s | moedist round us | busiest link bytes | floor us | round / floor "
                  "| MPI round us | MPI busiest link bytes | MPI floor us | MPI round / floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in links:
            m, b = r["moedist"], r["mpi_alltoallv"]

            def floor(x):
                return (f"{x['link_floor_us']:.1f} | {x['round_over_link_floor']:.2f}x" if "link_floor_us" in x else "- | -")

            lines.append(f"| {r['ranks']} | {r['hosts']} | {r.get('comm_alg', 'fullmesh')} | {r['tokens']} | {r.get('link_gbit', '-')} "
                         f"| {m['round_us']['median']:.1f} | {m.get('busiest_host_link_bytes_per_round', 0):.0f} | {floor(m)} "
                         f"| {b['round_us']['median']:.1f} | {b.get('busiest_host_link_bytes_per_round', 0):.0f} | {floor(b)} |")
    py = [r for r in rows if "python" in r]
    if py:  # moedist bench --python: the same configurations through the Python package
        lines += ["", "Python package (bench/python_bench.py) beside the C++ calls, same run:", "",
                  "| ranks | tokens | H | experts | quant | comm_quant | comm_alg | moedist round us "
                  "| python round us (p10-p90) | python / moedist | added per call us: dispatch | combine |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in py:
            p, m = r["python"], r["moedist"]
            head = (f"| {r['ranks']} | {r['tokens']} | {r['hidden']} | {r['experts']} | {r['quant_mode']} "
                    f"| {r.get('comm_quant_mode', 0)} | {r.get('comm_alg', 'fullmesh')} | {m['round_us']['median']:.1f} ")
            if "unavailable" in p:
                lines.append(head + f"| {p['unavailable']} | | | |")
                continue
            added = r["python_added_us_per_call"]
            lines.append(head + f"| {p['round_us']['median']:.1f} ({p['round_us']['p10']:.0f}-{p['round_us']['p90']:.0f}) "
                         f"| {r['python_vs_moedist_round']:.2f}x | {added['dispatch']:.1f} | {added['combine']:.1f} |")
    table = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(table)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: plot skipped; pip install matplotlib)", file=sys.stderr)
        return 0
    # One panel per (transport/alg, ranks, hidden); in each, one line per (experts, quant, comm_quant) for moedist
    # (solid) and the MPI_Alltoallv pipeline (dashed, same colour).
    panels = {}
    for r in rows:
        key = (r.get("transport", "shm"), r.get("comm_alg", "fullmesh"), r["ranks"], r["hidden"])
        panels.setdefault(key, {}).setdefault((r["experts"], r["quant_mode"], r.get("comm_quant_mode", 0)), []).append(r)
    keys = sorted(panels)
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        transport, alg, ranks, hidden = key
        for (experts, quant, comm_quant), rs in sorted(panels[key].items()):
            rs.sort(key=lambda r: r["tokens"])
            x = [r["tokens"] for r in rs]
            label = f"E={experts} quant={quant}" + (f" comm_quant={comm_quant}" if comm_quant else "")
            line = ax.plot(x, [r["moedist"]["round_us"]["median"] for r in rs], marker="o", label="moedist " + label)[0]
            ax.plot(x, [r["mpi_alltoallv"]["round_us"]["median"] for r in rs], marker="x", linestyle="--",
                    color=line.get_color(), label="MPI_Alltoallv " + label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("round (dispatch + combine), median us")
        ax.set_title(f"{ranks} ranks, H={hidden}, {transport}/{alg}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    print(f"plot: {out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
