"""experiments/step_ab.py's summary: per-round ratios against the first variant, paired by round."""

from experiments import step_ab


def test_summary_pairs_rounds_and_counts_faster_rounds():
    times = {"a": [0.100, 0.110, 0.100], "b": [0.095, 0.100, 0.105]}
    table = step_ab.summarize(["a", "b"], times, tokens=1000).splitlines()
    a_row, b_row = table[2], table[3]
    assert a_row.startswith("| a | 100.0 ms | 100.0 / 110.0 | 10.0k | 1.0000x (1.0000 .. 1.0000) | 0 / 3 |")
    # b's rounds: 0.100 / 0.095, 0.110 / 0.100, 0.100 / 0.105 -> 1.0526, 1.1000, 0.9524; faster in two of three
    assert b_row.startswith("| b | 100.0 ms | 95.0 / 105.0 | 10.0k | 1.0526x (0.9524 .. 1.1000) | 2 / 3 |"), b_row
