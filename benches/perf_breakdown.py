#!/usr/bin/env python3
"""Where kawka's time goes, per thread, from a `KAWKA_BENCH_PERF` recording.

    python3 benches/perf_breakdown.py <dir>/postgres_fresh.data [--thread tokio-rt] [--under fold::fold]

callgrind counts instructions; this counts time (perf's samples of the CPU
clock), which is what the harness's "µs per event" measures. The two
disagree where the work waits on memory: a 144-byte struct pushed into a
cold vector is one instruction-cheap `memcpy` and a tenth of a thread's
time (BENCHMARKS.md, 2026-12-07, seventh session).

Prints each thread's share of the samples, then, per thread (or the one
named by --thread), the samples by their nearest frame of kawka, its
libraries or librdkafka: a leaf in libc (memcpy, malloc, free) or the
kernel (a page fault, a socket write) counts for the code that called it.
With --under NAME, the samples of frames under NAME (a substring of a frame)
by their next three frames: what NAME's time is made of.
"""

import argparse
import collections
import subprocess
import sys

# Frames that own their time: kawka's code and the libraries whose cost is
# their own (Avro strings, TLS, sqlx, tokio's I/O, librdkafka, LZ4).
OWNERS = (
    "kawka::",
    "<kawka::",
    "smol_str::",
    "sqlx_",
    "<sqlx_",
    "rustls::",
    "ring_core",
    "tokio::runtime::io",
    "rd_kafka",
    "LZ4",
)


def samples(data):
    """(thread name, frames leaf first) per sample, from `perf script`."""
    text = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,ip,sym"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    sample = None
    for line in text.splitlines():
        if not line.strip():
            if sample:
                yield sample
            sample = None
        elif not line[0].isspace():
            sample = (line.split()[0], [])
        elif sample is not None:
            parts = line.split(None, 1)
            if len(parts) > 1:
                sample[1].append(parts[1].replace(" (inlined)", ""))
    if sample:
        yield sample


def owner(frames):
    return next((f for f in frames if f.startswith(OWNERS)), "(elsewhere)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a perf.data file (KAWKA_BENCH_PERF=<dir> writes <dir>/<run>.data)")
    parser.add_argument("--thread", help="only threads whose name starts with this")
    parser.add_argument("--under", help="break down the samples under frames containing this")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    args = parser.parse_args()

    by_thread = collections.defaultdict(list)
    for thread, frames in samples(args.data):
        by_thread[thread].append(frames)
    total = sum(len(s) for s in by_thread.values())
    if total == 0:
        sys.exit(f"no samples in {args.data}")
    print(f"{total} samples")
    for thread, frames in sorted(by_thread.items(), key=lambda item: -len(item[1])):
        print(f"{100 * len(frames) / total:6.1f}%  {thread}")

    for thread, all_frames in sorted(by_thread.items(), key=lambda item: -len(item[1])):
        if args.thread and not thread.startswith(args.thread):
            continue
        if len(all_frames) < total / 50 and not args.thread:
            continue
        n = len(all_frames)
        print(f"\n{thread}: {n} samples, by nearest owning frame")
        for name, count in collections.Counter(owner(f)[:140] for f in all_frames).most_common(args.top):
            print(f"{100 * count / n:6.1f}%  {name}")
        if args.under:
            under = collections.Counter()
            for frames in all_frames:
                at = [i for i, f in enumerate(frames) if args.under in f]
                if at:
                    below = frames[: at[-1]]
                    under[" > ".join(f[:70] for f in reversed(below[-3:])) or "(itself)"] += 1
            print(f"\n{thread}: {sum(under.values())} samples under `{args.under}`")
            for name, count in under.most_common(args.top):
                print(f"{100 * count / n:6.1f}%  {name}")


if __name__ == "__main__":
    main()
