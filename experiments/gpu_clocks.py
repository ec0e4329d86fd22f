"""The GPU's SM clock, power draw and throttle reasons, sampled by nvidia-smi while a workload runs.

A kernel's rate is its own only if the card held its clock. The H200 ran the FP8 grouped forward slower than the
H100 (926 against 949-999 TFLOP/s, same SMs and the same 1,980 MHz maximum clock). The clock read after a run only
shows the idle card, so it cannot tell whether a 700 W power cap lowered the clock under FP8 wgmma.
bench_fp8_gemm.py --sustain runs each forward for some seconds inside `sampled()` and prints `line(summary(...))`.

  with sampled() as samples:
      run_for_a_few_seconds()
  print(line(summary(samples)))   # "SM clock 1,980 MHz median (min 1,755), power 690 W max, ..., throttle: ..."
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def parse(text: str) -> list[tuple[float, float, str]]:
    """nvidia-smi's csv rows (noheader, nounits) of QUERY -> (SM MHz, watts, throttle bitmask); unreadable rows
    (a "[N/A]" power, a partial last line) are skipped."""
    rows = []
    for raw in text.splitlines():
        cells = [c.strip() for c in raw.split(",")]
        if len(cells) != 3:
            continue
        try:
            rows.append((float(cells[0]), float(cells[1]), cells[2]))
        except ValueError:
            continue
    return rows


@contextlib.contextmanager
def sampled(interval_ms: int = 100):
    """Yields a list that holds the (MHz, W, reasons) samples taken while the block ran (filled when it ends);
    empty where nvidia-smi is missing (a host without a GPU)."""
    samples: list[tuple[float, float, str]] = []
    exe = shutil.which("nvidia-smi")
    if exe is None:
        yield samples
        return
    cmd = [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"-lms={interval_ms}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield samples
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        samples.extend(parse(out))


def summary(samples) -> dict:
    """Clock (min, median) and power (median, max) over the samples, and every throttle bitmask seen."""
    if not samples:
        return {"samples": 0}
    mhz, watts, reasons = zip(*samples)
    return {
        "samples": len(samples),
        "sm_mhz_min": min(mhz),
        "sm_mhz_median": statistics.median(mhz),
        "power_w_median": statistics.median(watts),
        "power_w_max": max(watts),
        "throttle_reasons": sorted(set(reasons)),
    }


def line(s: dict) -> str:
    """One printable line of a summary()."""
    if not s["samples"]:
        return "no clock samples (nvidia-smi missing?)"
    return (
        f"SM clock {s['sm_mhz_median']:,.0f} MHz median (min {s['sm_mhz_min']:,.0f}), power {s['power_w_max']:,.0f} W "
        f"max ({s['power_w_median']:,.0f} median), {s['samples']} samples, throttle: {' '.join(s['throttle_reasons'])}"
    )
