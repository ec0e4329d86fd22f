"""Full attention implementations (XLA reference, TPU splash in interpret mode, cuDNN's packed-document layout) and
the one place "auto" runtime knobs are resolved (dsjax/runtime.py)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.errors import ConfigError
from dsjax.layers.attention import attention, causal_mask, segment_layout, xla_attention
from dsjax.layers.splash import splash_attention
from dsjax.runtime import choices, is_resolved, resolve, resolved, target_platform

SCALE = 0.0723  # not 1/sqrt(D): the caller's scale must be applied as given


def reference(q, k, v, segment_ids, scale):
    """float32, highest precision: query i sees key j iff j <= i and (with segment ids) both are in one document."""
    t = q.shape[1]
    mask = np.tril(np.ones((t, t), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    f = lambda x: x.astype(jnp.float32)  # noqa: E731
    s = jnp.einsum("bthd,bshd->bhts", f(q), f(k), precision="highest") * scale
    p = jax.nn.softmax(jnp.where(jnp.asarray(mask)[:, None], s, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, f(v), precision="highest")


def qkv(b, t, h, dqk, dv, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(ks[0], (b, t, h, dqk)).astype(dtype),
        jax.random.normal(ks[1], (b, t, h, dqk)).astype(dtype),
        jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype),
    )


def documents(t, bounds_per_row):
    """[B, T] int32 ids: row r split into documents at bounds_per_row[r] (ids 1, 2, ...)."""
    rows = np.zeros((len(bounds_per_row), t), np.int32)
    for r, bounds in enumerate(bounds_per_row):
        for i, (s, e) in enumerate(zip((0, *bounds), (*bounds, t))):
            rows[r, s:e] = i + 1
    return jnp.asarray(rows)


SEGS = ((50, 150), (128, 131))  # 3 documents per row, boundaries not block aligned (one exactly on 128)


def test_xla_attention_matches_reference():
    q, k, v = qkv(2, 40, 3, 24, 16)
    seg = documents(40, ((7, 30), (20,)))
    np.testing.assert_allclose(
        xla_attention(q, k, v, causal_mask(seg, 40), SCALE), reference(q, k, v, seg, SCALE), atol=2e-5
    )
    np.testing.assert_allclose(attention(q, k, v, None, SCALE, "xla"), reference(q, k, v, None, SCALE), atol=2e-5)
    with pytest.raises(ValueError, match="not resolved"):
        attention(q, k, v, None, SCALE, "auto")


@pytest.mark.parametrize("with_docs", [True, False])
def test_splash_forward_and_gradients(with_docs):
    """The TPU kernel body (interpret mode) against the reference: MLA's 192/128 head dims forward, tiny dims
    for gradients, a 2 x 2 block grid."""
    q, k, v = qkv(2, 256, 2, 192, 128)
    seg = documents(256, SEGS) if with_docs else None
    out = splash_attention(q, k, v, seg, SCALE, interpret=True, block=128)
    assert out.shape == (2, 256, 2, 128)
    np.testing.assert_allclose(out, reference(q, k, v, seg, SCALE), atol=2e-5)

    q, k, v = qkv(2, 256, 2, 24, 16, seed=3)
    ct = jax.random.normal(jax.random.key(9), (2, 256, 2, 16))
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * ct)  # noqa: E731
    ours = jax.jit(
        jax.grad(
            loss(lambda q, k, v: splash_attention(q, k, v, seg, SCALE, interpret=True, block=128)), argnums=(0, 1, 2)
        )
    )(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference(q, k, v, seg, SCALE)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_splash_any_length_and_padding_documents():
    """A prefill bucket need not be a multiple of 128 (pad_seq), and padding (id 0) is a document of its own."""
    q, k, v = qkv(1, 200, 2, 24, 16, seed=6)
    seg = documents(200, ((70, 140),)).at[0, 180:].set(0)
    with pytest.raises(ValueError, match="T=200"):
        splash_attention(q, k, v, seg, SCALE, interpret=True)
    out = splash_attention(q, k, v, seg, SCALE, interpret=True, pad_seq=True)
    np.testing.assert_allclose(out, reference(q, k, v, seg, SCALE), atol=2e-5)


def test_cudnn_segment_layout():
    """Documents -> cuDNN's packed layout: per-row lengths and start offsets, -1 past the last document; a row
    with more documents than slots keeps every token covered (its tail is one span)."""
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    seqlens, offsets = segment_layout(seg, 4)
    np.testing.assert_array_equal(seqlens, [[3, 2, 3, -1], [6, 2, -1, -1], [1, 1, 1, 5]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, 6, -1, -1, -1], [0, 1, 2, 3, -1]])
    assert seqlens.dtype == offsets.dtype == jnp.int32


def fake_devices(platform, n=2):
    return [types.SimpleNamespace(platform=platform, device_kind=f"fake {platform}") for _ in range(n)]


H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    "platform, kind, dtype, want",
    [
        (
            "gpu",
            H100,
            "bfloat16",
            dict(attention_impl="cudnn", moe_backend="gmm", moe_dispatch="ragged", fp8_backend="gpu"),
        ),
        (
            "gpu",
            H100,
            "float32",
            dict(attention_impl="xla", moe_backend="gmm", moe_dispatch="ragged", fp8_backend="gpu"),
        ),
        # not a Hopper: neither Mosaic GPU kernel (wgmma); XLA's ragged_dot for the experts
        (
            "gpu",
            "NVIDIA A100-SXM4-80GB",
            "bfloat16",
            dict(attention_impl="cudnn", moe_backend="ragged_dot", moe_dispatch="ragged", fp8_backend="xla"),
        ),
        (
            "tpu",
            "",
            "bfloat16",
            dict(attention_impl="splash", moe_backend="gmm", moe_dispatch="ragged", fp8_backend="xla"),
        ),
        (
            "cpu",
            "",
            "bfloat16",
            dict(attention_impl="xla", moe_backend="ragged_dot", moe_dispatch="padded", fp8_backend="xla"),
        ),
    ],
)
def test_auto_resolves_from_the_target_devices(platform, kind, dtype, want):
    cfg = dsjax.ModelConfig.preset("small", dtype=dtype)
    assert cfg.attention_impl == cfg.moe_backend == cfg.platform == "auto"  # every preset's default
    devices = [types.SimpleNamespace(platform="cuda" if platform == "gpu" else platform, device_kind=kind)]
    got = resolve(cfg, devices)
    assert got.platform == platform and {k: getattr(got, k) for k in want} == want
    assert is_resolved(got) and resolved(got) is got and choices(platform, dtype, kind) == want
    # explicit choices are kept; an explicit platform wins over the devices
    assert resolve(cfg.replace(attention_impl="xla"), fake_devices("tpu")).attention_impl == "xla"
    assert resolve(cfg.replace(platform="tpu"), fake_devices("cpu")).attention_impl == "splash"
    # the grouped matmul's GPU kernel asked for on a GPU that cannot run it: refused, naming the flag
    if platform == "gpu" and want["moe_backend"] != "gmm":
        with pytest.raises(ConfigError, match="moe_backend=gmm.*Hopper"):
            resolve(cfg.replace(moe_backend="gmm"), devices)


@pytest.mark.parametrize(
    "kind, want",
    [("NVIDIA H200", "gpu"), ("NVIDIA H100 80GB HBM3", "gpu"), ("NVIDIA GH200 480GB", "gpu"), ("NVIDIA H20", "gpu")]
    + [("NVIDIA A100-SXM4-80GB", "xla"), ("NVIDIA B200", "xla"), ("NVIDIA H100X", "xla"), ("", "xla")],
)
def test_fp8_backend_auto_is_the_kernels_on_hopper_only(kind, want):
    """The FP8 GEMM kernels run Hopper's wgmma: "auto" picks them on Hopper GPUs, the XLA reference elsewhere."""
    devices = [types.SimpleNamespace(platform="cuda", device_kind=kind)]
    assert resolve(dsjax.ModelConfig.preset("tiny", dtype="bfloat16", fp8="e4m3"), devices).fp8_backend == want
    assert choices("tpu", "bfloat16", kind)["fp8_backend"] == "xla"


def test_auto_on_this_host_and_in_the_model():
    assert target_platform() == jax.default_backend() == "cpu"
    with pytest.raises(ValueError, match="one platform"):
        target_platform(fake_devices("cpu") + fake_devices("tpu"))
    model = dsjax.DeepSeekV3(dsjax.ModelConfig.preset("tiny"))
    assert model.cfg.platform == "cpu" and model.cfg.attention_impl == "xla"


def test_resolve_takes_any_iterable_of_devices_and_the_chip_kind():
    """Trainers pass mesh.devices.flat (a one-shot iterator); the "lite" TPUs (v5e, v6e) get padded dispatch, as
    their compiler refuses ragged_all_to_all."""
    cfg = dsjax.ModelConfig.preset("tiny", dtype="bfloat16")
    assert resolve(cfg, iter(fake_devices("cuda"))).attention_impl == "cudnn"
    lite = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")] * 2
    assert resolve(cfg, iter(lite)).moe_dispatch == "padded"
    assert resolve(cfg, fake_devices("tpu")).moe_dispatch == "ragged"
