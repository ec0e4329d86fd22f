"""experiments/torch_baseline.py: the transformers training baseline runs on CPU and builds our shape without MTP."""

from __future__ import annotations

import math

import pytest

import dsjax
from experiments.torch_baseline import build_model, train_throughput  # imports torch only when called

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_train_throughput_tiny_cpu():
    cfg = dsjax.ModelConfig.preset("tiny")
    assert cfg.num_nextn_predict_layers == 1  # the baseline must drop it
    r = train_throughput(cfg.to_hf(), batch=2, seq_len=16, steps=2, warmup=1, dtype="float32", device="cpu")
    assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    assert math.isfinite(r["loss"])
    assert r["peak_mem_gib"] is None and r["dtype"] == "float32" and r["device"] == "cpu"
    assert r["experts_implementation"] in ("grouped_mm", "eager")

    model, _ = build_model(cfg.to_hf(), dtype="float32", device="cpu")
    assert r["params"] == model.num_parameters()
    # Same shape as ours: dsjax counts the router bias as a parameter, transformers keeps it as a buffer.
    assert r["params"] == cfg.param_counts()["total_without_mtp"] - cfg.num_moe_layers * cfg.n_routed_experts
    assert len(model.model.layers) == cfg.num_hidden_layers  # no MTP layer appended
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not any(f"layers.{cfg.num_hidden_layers}." in n for n in names)
    assert sum("e_score_correction_bias" in n for n in names) == cfg.num_moe_layers
