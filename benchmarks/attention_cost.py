"""Cost of one attention layer's forward + backward against the sequence length n.

q, k, v of shape (B, H, n, D) = (1, 4, n, 64), fp32, requiring grad; the output is
summed and backpropagated to q, k, v. Systems (all causal, the band |i - j| <= r):
  * explicit:    the written-out formula, `scaled_dot_product_attention(..., need_weights=True)`,
                 with the dense (n, n) causal band mask (r = 256)
  * fused:       the fused kernel, `scaled_dot_product_attention(...)` (F.scaled_dot_product_attention),
                 with the same dense mask
  * window-64:   `windowed_attention(q, k, v, 64, causal=True)`, default block
  * window-256:  `windowed_attention(q, k, v, 256, causal=True)`, default block
The dense mask is built inside the timed call (`self_attention_mask`), as
`MultiHeadAttention` builds it on every forward; the windowed path builds its own.

Each (system, n) runs in a fresh subprocess: warm-up calls, then `--repeats` timed calls;
the time is their median. Memory is the peak resident-set growth during the timed calls:
the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs after the
warm-up) minus the resident set just before them, with glibc told to return every
allocation over 64 KiB to the system on free (MALLOC_MMAP_THRESHOLD_), so that memory
freed by the warm-up is not counted as free room. It counts everything the call
allocates (scores, weights, masks, saved tensors, gradients of q, k, v), not the inputs.
A configuration whose memory, extrapolated from the previous n of the same system with the
measured growth (at most x4 per doubling), would exceed `--max-gib` is skipped.

The log-log slope of time and memory against n is fitted (least squares) on the points
with 1k <= n <= 16k. The crossover part times windowed against fused (same causal band
mask) for r in `--radii` on a grid of n (powers of two and their 1.5x), round-robin in one
subprocess, and reports the smallest grid n from which windowed is faster at every larger
grid point, to compare with the dispatch rule `use_windowed`: n > 4 * default_block(r).

Usage:
  python benchmarks/attention_cost.py                      # table, slopes, crossover, plot
  python benchmarks/attention_cost.py --ns 256,512 --no-crossover --plot ''   # quick
  python benchmarks/attention_cost.py --json               # the results as JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

SYSTEMS = ("explicit", "fused", "window-64", "window-256")
DENSE_WINDOW = 256  # the band of the dense masks in the table
B, H, D = 1, 4, 64


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process), to see other processes' load."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return busy, int(fields[11]) + int(fields[12])  # utime + stime of all threads


class Interference:
    """CPU seconds used by other processes while the block runs (jiffies of 1/100 s)."""

    def __enter__(self):
        self.start = _cpu_jiffies()
        return self

    def __exit__(self, *exc):
        end = _cpu_jiffies()
        self.other_s = max(0, (end[0] - self.start[0]) - (end[1] - self.start[1])) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float = 120.0, busy_max: float = 0.1) -> float:
    """Wait until the machine is nearly idle (< busy_max of all cores over 1 s); the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        a = _cpu_jiffies()[0]
        time.sleep(1.0)
        if (_cpu_jiffies()[0] - a) / os.sysconf("SC_CLK_TCK") / os.cpu_count() < busy_max:
            break
    return time.perf_counter() - t0


def make_call(system: str, n: int, window: int | None = None):
    """A function running one forward + backward of `system` at length n, and its inputs."""
    import torch

    from transformer.model.attention import scaled_dot_product_attention, self_attention_mask
    from transformer.model.window import windowed_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for _ in range(3))
    if system in ("explicit", "fused"):
        r = DENSE_WINDOW if window is None else window
        need_weights = system == "explicit"

        def forward():
            mask = self_attention_mask(n, n, causal=True, window=r)
            return scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)[0]
    elif system.startswith("window-"):
        r = int(system.split("-")[1]) if window is None else window

        def forward():
            return windowed_attention(q, k, v, r, causal=True)
    else:
        raise ValueError(system)

    def call():
        for x in (q, k, v):
            x.grad = None
        forward().sum().backward()

    return call


def worker(system: str, n: int, warmup: int, repeats: int) -> dict:
    """One configuration in this (fresh) process: median time and peak RSS growth."""
    call = make_call(system, n)
    for _ in range(warmup):
        call()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = _status_kib("VmRSS")
    times = []
    with Interference() as other:
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    return {"system": system, "n": n, "ms": 1000 * statistics.median(times),
            "times_ms": [1000 * t for t in times], "mib": (peak - base) / 1024,
            "other_cpu_frac": other.other_s / sum(times)}


def crossover_worker(r: int, ns: list[int], min_s: float) -> list[dict]:
    """Windowed r against fused (causal band r), round-robin per n; medians."""
    rows = []
    for n in ns:
        calls = {"window": make_call("window-x", n, window=r), "fused": make_call("fused", n, window=r)}
        for c in calls.values():  # warm-up
            c()
            c()
        for attempt in range(MAX_TRIES):
            wait_quiet()
            times = {s: [] for s in calls}
            total = 0.0
            with Interference() as other:
                while len(times["fused"]) < 5 or total < min_s:
                    for s, c in calls.items():
                        start = time.perf_counter()
                        c()
                        dt = time.perf_counter() - start
                        times[s].append(dt)
                        total += dt
            row = {"r": r, "n": n, "window_ms": 1000 * statistics.median(times["window"]),
                   "fused_ms": 1000 * statistics.median(times["fused"]), "calls": len(times["fused"]),
                   "other_cpu_frac": other.other_s / total, "tries": attempt + 1}
            if row["other_cpu_frac"] <= DISTURBED:
                break
        rows.append(row)
    return rows


MAX_TRIES = 3  # a configuration disturbed by other processes is measured again, up to this often
DISTURBED = 0.1  # other processes' CPU time over the timed wall time above which a measurement is redone


def run_sub(args: list[str]) -> object:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[int, float]], lo: int, hi: int) -> tuple[float, int] | None:
    """Least-squares slope of log y against log n over lo <= n <= hi, and the number of points."""
    pts = [(math.log(n), math.log(y)) for n, y in points if lo <= n <= hi and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    return sxy / sxx, len(pts)


def plot(rows: list[dict], slopes: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("ms", "time (ms)"), ("mib", "peak memory growth (MiB)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for system in SYSTEMS:
            pts = sorted((r["n"], r[key]) for r in rows if r["system"] == system and r[key] > 0)
            if not pts:
                continue
            s = slopes[system][key]
            name = f"{system} (slope {s[0]:.2f})" if s else system
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"attention forward+backward, B={B} H={H} D={D} fp32, causal; slopes fitted on 1k-16k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--ns", default=",".join(str(256 * 2**i) for i in range(7)), help="lengths")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median)")
    parser.add_argument("--max-gib", type=float, default=12.0, help="skip configurations predicted above this")
    parser.add_argument("--radii", default="16,64,256", help="radii for the crossover")
    parser.add_argument("--crossover-max", type=int, default=4096, help="largest n of the crossover grid")
    parser.add_argument("--no-crossover", action="store_true")
    parser.add_argument("--plot", default="docs/attention_cost.png", help="PNG path ('' for none)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--crossover-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.warmup, args.repeats)))
        return
    grid = sorted({m * 2**e for e in range(4, 13) for m in (2, 3)})
    grid = [n for n in grid if n <= args.crossover_max]
    if args.crossover_worker is not None:
        print(json.dumps(crossover_worker(args.crossover_worker, grid, min_s=0.3)))
        return

    t0 = time.perf_counter()
    ns = [int(x) for x in args.ns.split(",")]
    systems = args.systems.split(",")
    rows, skipped = measure(args, ns, systems)
    slopes = {s: {key: slope([(r["n"], r[key]) for r in rows if r["system"] == s], 1024, 16384)
                  for key in ("ms", "mib")} for s in systems}
    crossover = []
    if not args.no_crossover:
        for r in [int(x) for x in args.radii.split(",")]:
            pts = run_sub(["--crossover-worker", str(r), "--crossover-max", str(args.crossover_max)])
            crossover.extend(pts)
            print(f"crossover r={r} done", file=sys.stderr)
    if args.plot:
        plot(rows, slopes, args.plot)
    total_s = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"rows": rows, "skipped": skipped, "slopes": slopes,
                          "crossover": crossover, "total_s": total_s}, indent=1))
        return
    report(args, ns, systems, rows, slopes, crossover)
    print(f"\ntotal {total_s:.0f} s")


def measure(args: argparse.Namespace, ns: list[int], systems: list[str]) -> tuple[list[dict], list[dict]]:
    """One subprocess per (system, n), again while disturbed; skips n predicted above --max-gib."""
    rows, skipped = [], []
    for system in systems:
        last, growth = None, 4.0  # last row of this system; memory growth per doubling seen (at most 4)
        for n in ns:
            if last is not None:
                predicted = last["mib"] * growth ** math.log2(n / last["n"])
                if predicted > args.max_gib * 1024:
                    skipped.append({"system": system, "n": n, "predicted_mib": predicted})
                    print(f"skip {system} n={n}: ~{predicted / 1024:.1f} GiB predicted", file=sys.stderr)
                    continue
            for attempt in range(MAX_TRIES):
                wait_quiet()
                row = run_sub(["--worker", system, str(n), "--warmup", str(args.warmup), "--repeats", str(args.repeats)])
                row["tries"] = attempt + 1
                if row["other_cpu_frac"] <= DISTURBED:
                    break
                print(f"{system} n={n} disturbed ({row['other_cpu_frac']:.0%} other CPU), again", file=sys.stderr)
            print(f"{system} n={n}: {row['ms']:.1f} ms, {row['mib']:.1f} MiB", file=sys.stderr)
            rows.append(row)
            if last is not None and last["mib"] > 1:
                growth = min(4.0, max(1.0, row["mib"] / last["mib"]) ** (1 / math.log2(n / last["n"])))
            last = row
    return rows, skipped


def report(args: argparse.Namespace, ns: list[int], systems: list[str], rows: list[dict], slopes: dict,
           crossover: list[dict]) -> None:
    """The markdown tables: time and memory per n with the slopes, and the dispatch crossover."""
    import torch

    from transformer.model.window import use_windowed

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} D={D} fp32; "
          f"median of {args.repeats} after {args.warmup} warm-up\n")
    print("| n | " + " | ".join(f"{s} ms | {s} MiB" for s in systems) + " |")
    print("|---:|" + "---:|---:|" * len(systems))
    by = {(r["system"], r["n"]): r for r in rows}
    for n in ns:
        cells = []
        for s in systems:
            r = by.get((s, n))
            cells += [f"{r['ms']:,.1f}", f"{r['mib']:,.1f}"] if r else ["skipped", "skipped"]
        print(f"| {n:,} | " + " | ".join(cells) + " |")

    def fmt(sl):
        return f"{sl[0]:.2f} ({sl[1]} pts)" if sl else "n/a"

    print("| slope 1k-16k | " + " | ".join(f"{fmt(slopes[s]['ms'])} | {fmt(slopes[s]['mib'])}" for s in systems) + " |")
    if ("fused", 16384) in by and ("window-256", 16384) in by:
        print(f"\nn = 16k: window-256 is {by[('fused', 16384)]['ms'] / by[('window-256', 16384)]['ms']:.1f}x "
              "faster than fused")
    if not crossover:
        print_disturbed(rows)
        return
    print("\n| r | the rule uses windowed | n | windowed ms | fused ms | fused / windowed |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in crossover:
        print(f"| {p['r']} | {'yes' if use_windowed(p['n'], p['r']) else 'no'} | {p['n']:,} | "
              f"{p['window_ms']:.3f} | {p['fused_ms']:.3f} | {p['fused_ms'] / p['window_ms']:.2f} |")
    for r in sorted({p["r"] for p in crossover}):
        pts = [p for p in crossover if p["r"] == r]
        wins = [p["window_ms"] < p["fused_ms"] for p in pts]
        first = next((p["n"] for p, w in zip(pts, wins) if w), None)
        stable = next((p["n"] for i, p in enumerate(pts) if all(wins[i:])), None)
        rule = next((p["n"] for p in pts if use_windowed(p["n"], r)), None)
        print(f"r={r}: windowed first faster at n={first}, faster from n={stable} on; the rule uses it from n={rule}")
    print_disturbed(rows + crossover)


def print_disturbed(rows: list[dict]) -> None:
    bad = [r for r in rows if r["other_cpu_frac"] > DISTURBED]
    print(f"\nmeasurements still disturbed after {MAX_TRIES} tries (other processes' CPU > {DISTURBED:.0%}"
          f" of the timed wall time): {len(bad)}"
          + "".join(f"\n  {r.get('system', 'crossover r=' + str(r.get('r')))} n={r['n']}: {r['other_cpu_frac']:.0%}"
                    for r in bad))


if __name__ == "__main__":
    main()
