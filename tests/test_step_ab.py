"""experiments/step_ab.py's summary: per-round ratios against the first variant, paired by round."""

import dataclasses

import pytest

from experiments import step_ab


def test_summary_pairs_rounds_and_counts_faster_rounds():
    times = {"a": [0.100, 0.110, 0.100], "b": [0.095, 0.100, 0.105]}
    table = step_ab.summarize(["a", "b"], times, tokens=1000).splitlines()
    a_row, b_row = table[2], table[3]
    assert a_row.startswith("| a | 100.0 ms | 100.0 / 110.0 | 10.0k | 1.0000x (1.0000 .. 1.0000) | 0 / 3 |")
    # b's rounds: 0.100 / 0.095, 0.110 / 0.100, 0.100 / 0.105 -> 1.0526, 1.1000, 0.9524; faster in two of three
    assert b_row.startswith("| b | 100.0 ms | 95.0 / 105.0 | 10.0k | 1.0526x (0.9524 .. 1.1000) | 2 / 3 |"), b_row


def test_fp8_gemm_overrides_name_variants_and_swap_the_default_only_inside():
    from pallas_kernels.fp8_gemm import gpu_config

    assert step_ab.gemm_overrides("b:ring_loads=true,block_m=128", ["a", "b"]) == {
        "b": {"ring_loads": True, "block_m": 128}
    }
    assert step_ab.gemm_overrides("", ["a"]) == {}
    with pytest.raises(ValueError, match="--fp8_gemm"):
        step_ab.gemm_overrides("c:ring_loads=true", ["a", "b"])
    before = gpu_config.default_config(7168)
    with step_ab.default_gemm({"ring_loads": True}):
        assert gpu_config.default_config(7168) == dataclasses.replace(before, ring_loads=True)
        assert gpu_config.default_config(1024).ring_loads
    assert gpu_config.default_config(7168) == before and not before.ring_loads


def test_paired_ratios_pair_by_index():
    from experiments.bench_util import paired_ratios

    # base / other per pair: 2.0, 0.5, 1.25 -> median 1.25, min 0.5, max 2.0, two faster
    assert paired_ratios([2.0, 1.0, 2.5], [1.0, 2.0, 2.0]) == (1.25, 0.5, 2.0, 2)
    with pytest.raises(ValueError):  # unpaired timings are an error, not a silent truncation
        paired_ratios([1.0, 2.0], [1.0])
