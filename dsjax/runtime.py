"""Every "auto" runtime knob of a ModelConfig, resolved in one place from the devices a run targets.

The trainers, the generation engine and AOT compile jobs call `resolve(cfg, devices)` once, when they are built,
with the devices of the mesh they run on or compile for (a CPU host compiling for a TPU slice passes the slice's
TPU devices and gets the TPU kernels). `DeepSeekV3` resolves a config that still says "auto" against the local
devices (`resolved`), so `DeepSeekV3(ModelConfig.preset(...)).apply(...)` works anywhere as written.

    platform        "cpu" | "gpu" | "tpu"
    attention_impl  gpu: "cudnn" (bf16/f16 compute, else "xla"); tpu: "splash"; cpu: "xla"
    moe_backend     Hopper GPUs / tpu: "gmm" (Pallas grouped matmul: Mosaic GPU's wgmma, Mosaic TPU); other GPUs and
                    cpu: "ragged_dot" (an explicit "gmm" on another GPU is refused)
    moe_dispatch    gpu / tpu: "ragged" (ragged_all_to_all); TPU v5e / v6e ("lite" chips) and cpu: "padded"
    fp8_backend     Hopper GPUs (H100 / H200 / H800 / H20 / GH200): "gpu", the Mosaic GPU FP8 kernels (e4m3 wgmma,
                    Hopper only) and their Triton quantizers; elsewhere "xla", the dequantize reference (FP8's
                    numerics, not its speed). Only read when ModelConfig.fp8 asks for FP8. On the H200 a slice at
                    DeepSeek-V3's widths steps 1.09x faster on them than in BF16; small's narrower layers 1.05x
                    slower with every layer in FP8, 1.7% faster with its experts only (fp8_layers="experts",
                    paired timing on an H100; experiments/BENCHMARKS.md)

The Pallas kernels (gmm, mla_decode) are handed `cfg.platform`: their own "auto" (decode_attention_impl "auto")
then only chooses between the platform's kernel and the XLA reference by dtype and shape, never by the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from dsjax.config import ModelConfig
from dsjax.errors import ConfigError

PLATFORMS = ("cpu", "gpu", "tpu")
# The knobs resolve() decides: they describe where a run executes, not the model, so a checkpoint's values are
# not carried to a run elsewhere (load_for_inference resets them to "auto").
AUTO_FIELDS = ("platform", "attention_impl", "moe_backend", "moe_dispatch", "fp8_backend")
_HALF = ("bfloat16", "float16")
# Chips whose tensor cores run the FP8 kernels' wgmma (sm_90): named in device_kind, e.g. "NVIDIA H100 80GB HBM3"
_HOPPER = ("H100", "H200", "H800", "H20", "GH200")


def target_platform(devices: Sequence | None = None) -> str:
    """ "cpu", "gpu" or "tpu": the platform of `devices` (default: this process's devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices to resolve the runtime knobs for")
    kinds = {d.platform for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"a run's devices must share one platform, got {sorted(kinds)}")
    platform = kinds.pop()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def choices(platform: str, dtype: str, device_kind: str = "") -> dict[str, str]:
    """What each "auto" knob becomes on `platform` (chip `device_kind`) for a model computing in `dtype`."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is not one of {PLATFORMS}")
    accel = platform != "cpu"
    attention = {"gpu": "cudnn" if dtype in _HALF else "xla", "tpu": "splash", "cpu": "xla"}[platform]
    # The "lite" TPUs (v5e, v6e) route ICI in a limited way that ragged_all_to_all does not support (their compiler
    # refuses it): fixed-size blocks there.
    ragged = accel and not (platform == "tpu" and "lite" in device_kind.lower())
    return {
        "attention_impl": attention,
        "moe_backend": "gmm" if platform == "tpu" or (platform == "gpu" and is_hopper(device_kind)) else "ragged_dot",
        "moe_dispatch": "ragged" if ragged else "padded",
        "fp8_backend": "gpu" if platform == "gpu" and is_hopper(device_kind) else "xla",
    }


def is_hopper(device_kind: str) -> bool:
    """Whether a GPU's device_kind names a Hopper chip (the FP8 GEMM kernels' wgmma)."""
    return any(word in _HOPPER for word in device_kind.replace("-", " ").split())


def resolve(cfg: ModelConfig, devices: Sequence | None = None) -> ModelConfig:
    """cfg with `platform` and every "auto" knob made concrete for `devices` (explicit values are kept; an
    explicit cfg.platform wins over the devices)."""
    devices = list(jax.devices() if devices is None else devices)  # may be an iterator (mesh.devices.flat)
    host = target_platform(devices)
    platform = cfg.platform if cfg.platform != "auto" else host
    kind = getattr(devices[0], "device_kind", "") if platform == host else ""
    picks = choices(platform, cfg.dtype, kind)
    if platform == "gpu" and cfg.moe_backend == "gmm" and kind and not is_hopper(kind):
        raise ConfigError(
            f"--config.model.moe_backend=gmm: the Pallas grouped matmul's GPU kernel needs a Hopper GPU (H100 / H200 "
            f"class); this run targets {kind!r}: use ragged_dot (or auto)"
        )
    return cfg.replace(platform=platform, **{k: v for k, v in picks.items() if getattr(cfg, k) == "auto"})


def resolved(cfg: ModelConfig) -> ModelConfig:
    """cfg itself once resolved; else resolved against this process's devices."""
    return cfg if is_resolved(cfg) else resolve(cfg)


def is_resolved(cfg: ModelConfig) -> bool:
    return cfg.platform != "auto" and all(getattr(cfg, k) != "auto" for k in choices("cpu", cfg.dtype))
