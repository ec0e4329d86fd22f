"""experiments/gpu_clocks.py: nvidia-smi's samples are parsed, summarised and collected from a live sampler (a
stand-in nvidia-smi on PATH), and a host without nvidia-smi gets an empty, printable summary."""

import os
import stat
import time

from experiments import gpu_clocks


def test_parse_and_summary_keep_readable_rows():
    text = "1980, 310.5, 0x0000000000000000\n1755, 699.8, 0x0000000000000004\n1830, [N/A], 0x0\n1890, 650.0"
    rows = gpu_clocks.parse(text)
    assert rows == [(1980.0, 310.5, "0x0000000000000000"), (1755.0, 699.8, "0x0000000000000004")]
    s = gpu_clocks.summary(rows)
    assert (s["samples"], s["sm_mhz_min"], s["power_w_max"]) == (2, 1755.0, 699.8)
    assert s["throttle_reasons"] == ["0x0000000000000000", "0x0000000000000004"]
    assert "min 1,755" in gpu_clocks.line(s) and "700 W max" in gpu_clocks.line(s)


def test_sampled_collects_a_live_samplers_rows(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # prints two samples, then keeps running until terminated, as -lms does
    fake.write_text("#!/bin/sh\necho '1980, 120.0, 0x0'\necho '1965, 640.0, 0x4'\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with gpu_clocks.sampled(interval_ms=50) as samples:
        time.sleep(0.5)
        assert samples == []  # filled when the block ends
    assert samples == [(1980.0, 120.0, "0x0"), (1965.0, 640.0, "0x4")]


def test_no_nvidia_smi_gives_an_empty_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with gpu_clocks.sampled() as samples:
        pass
    assert samples == [] and gpu_clocks.summary(samples) == {"samples": 0}
    assert "no clock samples" in gpu_clocks.line(gpu_clocks.summary(samples))
