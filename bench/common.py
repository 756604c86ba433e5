"""Shared benchmark plumbing: where it ran, timing, and the committed results table."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# What a person wrote from this line on in a committed results file (why a rule is what it is,
# experiments not committed as scripts) outlives the benchmark's next run of that file.
KEPT_MARKER = "<!-- kept across runs: written by hand below, not by the benchmark -->"


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    # A device machine gets the working tree without .git: the caller passes the commit.
    if os.environ.get("MSA_BENCH_COMMIT"):
        return os.environ["MSA_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def kernel_times_us(fn: Callable[[], object], runs: int) -> dict[str, float]:
    """GPU time of each kernel name over one call of `fn`, averaged over `runs` calls
    (torch.profiler's CUDA activity; kernels replayed inside CUDA graphs included)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = (times.get(event.name, 0.0)
                                  + event.time_range.elapsed_us() / runs)
    return times


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, table: str, notes: str = "",
                  directory: Path | None = None) -> Path:
    """Prints the table and writes <directory or bench/results>/<name>.md with device, commit
    and date (a device machine writes elsewhere and the file is copied back), followed by the
    committed file's sections from `KEPT_MARKER` on."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# {title}\n\n- device: {device_description()}\n- commit: {git_commit()}\n"
            f"- date: {stamp}\n- torch: {torch.__version__}\n\n{table}\n")
    if notes:
        text += f"\n{notes.strip()}\n"
    print(text)
    committed = RESULTS / f"{name}.md"
    if committed.exists() and KEPT_MARKER in (old := committed.read_text()):
        text += "\n" + old[old.index(KEPT_MARKER):]
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.md"
    path.write_text(text)
    return path
