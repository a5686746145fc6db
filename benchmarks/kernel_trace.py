"""Where a jitted step's device time goes, from a jax.profiler trace: GPU kernels per step, by kind and by name.

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        ...run `calls` steps...
    summary = summarize(log_dir, calls)
    print(format_summary(summary))

The trace's device processes ("/device:GPU:N") hold one timeline per CUDA stream ("Stream #..."), whose events are
the kernels and copies as the GPU ran them. Per step: how many ran, their summed time, the time the stream was busy
(overlaps counted once) and the span from the first kernel to the last, each by kind (KINDS) and for the longest
kernels by name. A trace with no device events (a CPU run) gives a summary with zero kernels.
"""

import collections
import glob
import gzip
import json
import os
import re

# kind -> pattern on the kernel name (first match wins); "xla fusion" is what XLA generates itself.
KINDS = {
    "pallas gla": r"^gla_",
    "pallas conv": r"^depthwise_conv",
    "attention (cuDNN)": r"cudnn|fmha|flash",
    "matmul": r"gemm|xmma|cutlass|sm\d+_",
    "copy / memset": r"copy|memcpy|memset",
    "xla fusion": r"fusion|reduce|transpose|concatenate|slice|pad|convert|add|mul",
}
TOP_KERNELS = 25


def kind_of(name: str) -> str:
    for kind, pattern in KINDS.items():
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def trace_file(log_dir: str) -> str:
    """The newest perfetto trace jax.profiler.trace(log_dir, create_perfetto_trace=True) wrote."""
    paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        raise FileNotFoundError(f"no plugins/profile/*/perfetto_trace.json.gz under log_dir={log_dir!r}; trace "
                                "with jax.profiler.trace(log_dir, create_perfetto_trace=True)")
    return paths[-1]


def stream_events(events: list[dict]) -> list[dict]:
    """The complete ('X') events on the CUDA-stream timelines of device processes."""
    process_names, thread_names = {}, {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            process_names[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            thread_names[(event["pid"], event["tid"])] = event["args"]["name"]
    return [event for event in events
            if event.get("ph") == "X" and process_names.get(event.get("pid"), "").startswith("/device:")
            and thread_names.get((event["pid"], event.get("tid")), "").startswith("Stream")]


def kernel_events(log_dir: str) -> list[dict]:
    """The stream events (`stream_events`) of the newest trace under log_dir."""
    with gzip.open(trace_file(log_dir), "rt") as f:
        trace = json.load(f)
    return stream_events(trace["traceEvents"] if isinstance(trace, dict) else trace)


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def summarize(log_dir: str, calls: int) -> dict:
    """Per-call kernel statistics of the trace under log_dir that covered `calls` step calls (times in ms)."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    kernels = kernel_events(log_dir)
    intervals = [(event["ts"], event["ts"] + event.get("dur", 0.0)) for event in kernels]
    by_kind = collections.defaultdict(lambda: {"count": 0, "ms": 0.0})
    by_name = collections.defaultdict(lambda: {"count": 0, "ms": 0.0})
    for event in kernels:
        for table, key in ((by_kind, kind_of(event["name"])), (by_name, event["name"])):
            table[key]["count"] += 1
            table[key]["ms"] += event.get("dur", 0.0) / 1e3
    per_call = lambda stats: {"count": stats["count"] / calls, "ms": stats["ms"] / calls}  # noqa: E731
    longest = sorted(by_name.items(), key=lambda item: -item[1]["ms"])[:TOP_KERNELS]
    return {
        "calls": calls,
        "kernels": len(kernels) / calls,
        "kernel_ms": sum(event.get("dur", 0.0) for event in kernels) / 1e3 / calls,
        "busy_ms": _busy_us(intervals) / 1e3 / calls,
        "span_ms": (max(stop for _, stop in intervals) - min(start for start, _ in intervals)) / 1e3 / calls
        if intervals else 0.0,
        "by_kind": {kind: per_call(stats) for kind, stats in sorted(by_kind.items(), key=lambda item: -item[1]["ms"])},
        "longest": [{"name": name, **per_call(stats)} for name, stats in longest],
    }


def format_summary(summary: dict, title: str) -> str:
    """Markdown: the per-call totals, a table by kind, then the longest kernels."""
    def table(header, rows):
        lines = [f"| {header} | per call | ms | mean us |", "|---|---|---|---|"]
        for label, stats in rows:
            mean_us = 1e3 * stats["ms"] / stats["count"] if stats["count"] else 0.0
            lines.append(f"| {label} | {stats['count']:.0f} | {stats['ms']:.3f} | {mean_us:.1f} |")
        return lines

    head = (f"{title}: {summary['kernels']:.0f} kernels per call, {summary['kernel_ms']:.3f} ms summed, "
            f"{summary['busy_ms']:.3f} ms busy, {summary['span_ms']:.3f} ms first to last")
    return "\n".join([head, "", *table("kind", summary["by_kind"].items()), "",
                      *table("kernel", [(f"`{row['name'][:80]}`", row) for row in summary["longest"]])])
