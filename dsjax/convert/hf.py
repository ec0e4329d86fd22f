"""Hugging Face safetensors <-> dsjax params: reading (`load_hf`), and the public names of HF I/O.

How each dsjax leaf maps to HF tensors (the rule table, `Unit`s) lives in plan.py; writing HF directories
(`save_hf`, `hf_tensors`, `atomic_dir`, the export side of the converter) lives in export.py and is importable from
here too. `load_hf` assembles units in memory; the streaming converter (stream.py) reads them one at a time.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.convert import fp8 as fp8_lib
from dsjax.convert import safetensors_io as st
from dsjax.convert.export import atomic_dir, hf_tensors, save_hf  # noqa: F401  (public names of HF I/O)
from dsjax.convert.plan import Unit, expected_shapes, hf_shapes, mtp_copies, set_leaf, units
from dsjax.convert.source import CheckpointError, HFSource

INDEX = st.INDEX


class MissingTensorError(CheckpointError, KeyError):
    __str__ = CheckpointError.__str__  # KeyError would print the message in quotes


# ------------------------------------------------------------------------------------------------ reading
def resolve_mtp(cfg: ModelConfig, source: HFSource) -> ModelConfig:
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(k.startswith(mtp_prefix) for k in source.names()):
        warnings.warn(
            f"{source.dir}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
            "checkpoint holds no MTP layer (transformers' save_pretrained drops it); loading without MTP",
            stacklevel=2,
        )
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return cfg


def check_source(cfg: ModelConfig, source: HFSource) -> list[Unit]:
    """Every tensor the config needs is there with its shape (and its FP8 scale), and nothing else is: checked from
    the headers alone, before any data is read or any output written. Returns the units to convert."""
    shapes = expected_shapes(cfg)
    todo = units(cfg)
    need: set[str] = set()
    for u in todo:
        for name, shape in zip(u.names, hf_shapes(u, shapes[u.path])):
            need.add(name)
            if name not in source:
                raise MissingTensorError(f"{source.dir}: checkpoint is missing tensor {name!r} (needed for {u.path})")
            got, dtype = source.shape(name), source.dtype(name)
            if got != shape:
                raise CheckpointError(
                    f"{source.file_of(name)}: tensor {name!r} has shape {got}, but the config "
                    f"needs {shape} (does config.json belong to these weights?)"
                )
            if dtype not in _FLOATS:
                raise CheckpointError(f"{source.file_of(name)}: tensor {name!r} has dtype {dtype}; expected a float")
            if dtype == fp8_lib.E4M3:
                _check_scale(source, name, shape)
                need.add(fp8_lib.scale_name(name))
    copies = {name for name, _ in mtp_copies(cfg)}
    # rotary inverse frequencies are derived from the config; some older checkpoints store them as buffers
    derived = {n for n in source.names() if n.endswith("rotary_emb.inv_freq")}
    unexpected = sorted(set(source.names()) - need - copies - derived)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{source.dir}: unexpected tensors for this config: {unexpected[:5]}{more} (first in "
            f"{source.file_of(unexpected[0])}; does config.json belong to these weights?)"
        )
    return todo


_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16), fp8_lib.E4M3}


def _check_scale(source, name, shape):
    scale = fp8_lib.scale_name(name)
    if scale not in source:
        raise MissingTensorError(f"{source.file_of(name)}: FP8 tensor {name!r} has no block scale {scale!r}")
    want = fp8_lib.scale_shape(shape)
    if source.shape(scale) != want or source.dtype(scale) not in _FLOATS - {fp8_lib.E4M3}:
        raise CheckpointError(
            f"{source.file_of(scale)}: scale {scale!r} is {source.shape(scale)} "
            f"{source.dtype(scale)}, but a {shape} FP8 weight with 128x128 blocks needs {want} "
            "float32"
        )


def read_unit(source: HFSource, unit: Unit, dtype) -> np.ndarray:
    """A unit's slice of its leaf, in `dtype` (FP8 dequantized on the way in)."""
    return unit.rule.join([source.read(name, dtype) for name in unit.names])


def load_hf(hf_dir: str, dtype=jnp.float32, cfg: ModelConfig | None = None, allow_pickle: bool = False, **runtime):
    """Load an HF DeepSeek-V2/V3 directory -> (ModelConfig, params): bf16, float32 or FP8 (block-dequantized).

    Router weights and the correction bias stay float32 (as transformers keeps them); everything else is cast
    to `dtype`. Missing, unexpected and wrongly shaped tensors are errors that name the tensor and file. The whole
    model is built in host memory; for checkpoints that do not fit, stream them (`dsjax.convert.stream`).
    """
    cfg = cfg or ModelConfig.from_hf(hf_dir, **runtime)
    with HFSource(hf_dir, allow_pickle) as source:
        cfg = resolve_mtp(cfg, source)
        shapes = expected_shapes(cfg)
        arrays: dict[str, np.ndarray] = {}
        for u in check_source(cfg, source):
            dt = np.dtype(jnp.float32 if u.router else dtype)
            if u.path not in arrays:
                arrays[u.path] = np.empty(shapes[u.path], dt)
            arrays[u.path][u.index] = read_unit(source, u, dt)
    params: dict = {}
    for path, a in arrays.items():
        set_leaf(params, path, jnp.asarray(a))
    return cfg, params
