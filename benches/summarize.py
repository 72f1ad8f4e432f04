#!/usr/bin/env python3
"""Summarise several full runs of benches/load.sh: the medians issue 7's targets are judged on.

    for i in 1 2 3 4 5; do benches/load.sh > /tmp/run$i.txt; done
    python3 benches/summarize.py /tmp/run[1-5].txt

Each run's ratios are taken within that run (credlock and nginx measured in the same rounds),
then the median over runs is compared with the target. Prints Markdown: the targets run by run
with their medians and verdicts, CPU per request of credlock against nginx, and the median of
every table row; a run whose cells had errors is named in a note first. Exit status: 0 (misses
are information), 1 a file is not a load.sh output, or a run lacks a row a target needs (a cell
that failed outright), 2 usage.
"""

import re
import statistics
import sys

TARGETS = ("upstream", "credlock", "nginx", "haproxy")
ROW = re.compile(r"^\| (\w+) \| (\w+) \| (\d+) \| (\d+)( \(\d+ errors\))? \| (\S+) \| (\S+) \|.*\| (\S+) \|$")
STAMP = re.compile(r"credlock load benchmark \(([^,]+), (\w+) mode\)")
RSS = re.compile(r"peak RSS through the soak: ([\d.]+) MiB = ([\d.]+) MB")
READY = re.compile(r"READY after start: median (\d+) ms")
SOAK = re.compile(r"soak: (\d+) requests \(target >= (\d+)\), errors (\d+), RSS growth -?\d+ MiB \((-?\d+) kB")


def micros(text):
    """'130us' or '4.68ms' as microseconds."""
    if text.endswith("ms"):
        return float(text[:-2]) * 1000
    if text.endswith("us"):
        return float(text[:-2])
    raise ValueError(f"not a latency: {text}")


def parse(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stamp = STAMP.search(text)
    if not stamp:
        raise ValueError(f"{path}: not a benches/load.sh output")
    run = {"file": path, "when": stamp.group(1), "mode": stamp.group(2), "rows": {}}
    for line in text.splitlines():
        m = ROW.match(line)
        if m and m.group(1) in TARGETS:
            run["rows"][(m.group(1), m.group(2), int(m.group(3)))] = {
                "rps": float(m.group(4)),
                "errors": bool(m.group(5)),
                "p50": micros(m.group(6)),
                "p99": micros(m.group(7)),
                "cpu": float(m.group(8)) if m.group(8) != "-" else None,
            }
    for key, pattern in (("rss_mb", RSS), ("ready_ms", READY), ("soak", SOAK)):
        m = pattern.search(text)
        run[key] = m.groups() if m else None
    return run


def row(run, target, path, conns):
    try:
        return run["rows"][(target, path, conns)]
    except KeyError:
        raise ValueError(f"{run['file']}: no row for {target} {path} {conns}") from None


def fmt_us(us):
    return f"{us / 1000:.2f}ms" if us >= 1000 else f"{us:.0f}us"


def main(paths):
    runs = [parse(p) for p in paths]
    if any(r["mode"] != "full" for r in runs):
        print("note: some runs are not full runs (--quick); their figures are not comparable\n")
    for i, r in enumerate(runs):
        bad = [" ".join(map(str, k)) for k, v in r["rows"].items() if v["errors"]]
        if bad:
            print(f"note: run {i + 1} ({r['file']}) had errors in: {', '.join(bad)}; load.sh failed it\n")

    # (label, per-run value, passes(median))
    targets = []
    for conns in (1, 64):
        targets.append((
            f"passthrough req/s >= 1.0x nginx, {conns} conn",
            [row(r, "credlock", "passthrough", conns)["rps"] / row(r, "nginx", "passthrough", conns)["rps"] for r in runs],
            lambda m: m >= 1.0,
        ))
        targets.append((
            f"passthrough p99 <= nginx, {conns} conn",
            [row(r, "credlock", "passthrough", conns)["p99"] / row(r, "nginx", "passthrough", conns)["p99"] for r in runs],
            lambda m: m <= 1.0,
        ))
    for conns in (1, 64):
        targets.append((
            f"credential route >= 0.9x own passthrough, {conns} conn",
            [row(r, "credlock", "credentials", conns)["rps"] / row(r, "credlock", "passthrough", conns)["rps"] for r in runs],
            lambda m: m >= 0.9,
        ))

    print(f"{len(runs)} runs: " + "; ".join(f"{i + 1} = {r['file']} ({r['when']})" for i, r in enumerate(runs)) + "\n")
    head = " | ".join(str(i + 1) for i in range(len(runs)))
    print(f"| target | {head} | median | |")
    print("|---|" + "---|" * len(runs) + "---|---|")
    for label, values, ok in targets:
        med = statistics.median(values)
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(f"| {label} | {cells} | {med:.4f} | {'PASS' if ok(med) else 'MISS'} |")
    # A run without the line (cut short) shows "-" and fails the target.
    rss = [float(r["rss_mb"][1]) if r["rss_mb"] else None for r in runs]
    ready = [int(r["ready_ms"][0]) if r["ready_ms"] else None for r in runs]
    soak_ok = [r["soak"] is not None and int(r["soak"][0]) >= int(r["soak"][1]) and r["soak"][2] == "0"
               and int(r["soak"][3]) <= 1024 for r in runs]   # kB, load.sh's own allowance
    cells = " | ".join("-" if v is None else f"{v:.1f}" for v in rss)
    ok = None not in rss and max(rss) < 20
    worst = f"{max(v for v in rss if v is not None):.1f} (max)" if any(v is not None for v in rss) else "-"
    print(f"| peak RSS < 20 MB through the soak (MB) | {cells} | {worst} | {'PASS' if ok else 'MISS'} |")
    cells = " | ".join("-" if v is None else str(v) for v in ready)
    med = statistics.median(v for v in ready if v is not None) if any(v is not None for v in ready) else None
    ok = None not in ready and med < 500
    print(f"| READY < 500 ms (median of each run, ms) | {cells} | {'-' if med is None else f'{med:g}'} | {'PASS' if ok else 'MISS'} |")
    cells = " | ".join("yes" if ok else "no" for ok in soak_ok)
    print(f"| soak >= 1M requests, no errors, no growth | {cells} | | {'PASS' if all(soak_ok) else 'MISS'} |")

    print("\nCPU per request (user+system, us), credlock against the nginx proxy, run by run:\n")
    for path in ("passthrough", "token", "credentials"):
        for conns in (1, 64):
            pairs = [(row(r, "credlock", path, conns)["cpu"], row(r, "nginx", path, conns)["cpu"]) for r in runs]
            pairs = [(c, n) for c, n in pairs if c is not None and n is not None]
            if not pairs:
                continue
            lower = sum(1 for c, n in pairs if c < n)
            med = statistics.median(c / n for c, n in pairs)
            cells = ", ".join(f"{c:g}/{n:g}" for c, n in pairs)
            print(f"- {path}, {conns} conn: {cells}; credlock lower in {lower} of {len(pairs)} runs; median ratio {med:.3f}")

    print(f"\nMedian over the {len(runs)} runs of every row (ratios: the median of each run's ratio):\n")
    print("| target | path | conns | req/s | p50 | p99 | x upstream | x nginx | CPU us/req |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for target, path, conns in runs[0]["rows"]:
        present = [r for r in runs if (target, path, conns) in r["rows"]]
        cells = [r["rows"][(target, path, conns)] for r in present]
        vs_up = [c["rps"] / r["rows"][("upstream", path, conns)]["rps"] for c, r in zip(cells, present)
                 if ("upstream", path, conns) in r["rows"]]
        vs_ngx = [c["rps"] / r["rows"][("nginx", path, conns)]["rps"] for c, r in zip(cells, present)
                  if ("nginx", path, conns) in r["rows"]]
        cpu = [c["cpu"] for c in cells if c["cpu"] is not None]
        if not (vs_up and vs_ngx and cpu):
            print(f"| {target} | {path} | {conns} | (incomplete) | | | | | |")
            continue
        errors = " (errors in some runs)" if any(c["errors"] for c in cells) else ""
        rps = statistics.median(c["rps"] for c in cells)
        p50 = fmt_us(statistics.median(c["p50"] for c in cells))
        p99 = fmt_us(statistics.median(c["p99"] for c in cells))
        print(f"| {target} | {path} | {conns} | {rps:.0f}{errors} | {p50} | {p99} "
              f"| {statistics.median(vs_up):.2f} | {statistics.median(vs_ngx):.2f} | {statistics.median(cpu):.1f} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(2 if len(sys.argv) < 2 else 0)
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, ValueError) as e:
        print(f"summarize.py: {e}", file=sys.stderr)
        sys.exit(1)
