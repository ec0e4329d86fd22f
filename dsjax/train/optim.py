"""Optimizer (Optax AdamW, DeepSeek-V3 defaults), LR schedules, and the aux-loss-free router-bias update.

The router correction bias lives in the params tree (so checkpoints and HF conversion see it) but is not a
trained parameter: the optimizer gives it a zero update and no weight decay, and `update_router_bias` moves it
after each optimizer step by the sign rule on that step's global per-expert token counts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dsjax.errors import ConfigError
from dsjax.layers.moe import ROUTER_BIAS

MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: str = "cosine"  # "cosine", "constant", or "step" (x step_factor at each step_boundaries fraction)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    step_boundaries: tuple[float, ...] = (0.8, 0.9)
    step_factor: float = 0.316
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Storage dtype of AdamW's two moments: "float32", or "bfloat16" as DeepSeek-V3 keeps them (half the optimizer
    # state and its memory traffic; the update arithmetic stays float32)
    moment_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "step_boundaries", tuple(self.step_boundaries))  # hashable (step-fn cache key)
        if self.schedule not in ("cosine", "constant", "step"):
            raise ConfigError(f"--config.optim.schedule={self.schedule!r} is not one of cosine, constant, step")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ConfigError(
                f"total_steps must be >= 1 and --config.optim.warmup_steps >= 0 "
                f"(got {self.total_steps}, {self.warmup_steps})"
            )
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ConfigError(f"--config.optim.moment_dtype={self.moment_dtype!r} is not one of {MOMENT_DTYPES}")
        if self.lr < 0 or not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1 or self.clip_norm < 0:
            raise ConfigError(
                f"--config.optim: lr must be >= 0, b1 and b2 in [0, 1), clip_norm >= 0 (got lr={self.lr}, "
                f"b1={self.b1}, b2={self.b2}, clip_norm={self.clip_norm})"
            )


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    warm = max(c.warmup_steps, 0)
    rest = max(c.total_steps - warm, 1)
    if c.schedule == "cosine":
        decay = optax.cosine_decay_schedule(c.lr, rest, alpha=c.min_lr_ratio)
    elif c.schedule == "constant":
        decay = optax.constant_schedule(c.lr)
    else:
        decay = optax.piecewise_constant_schedule(
            c.lr, {int(f * c.total_steps) - warm: c.step_factor for f in c.step_boundaries}
        )
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(c.lr / warm, c.lr, warm - 1), decay], [warm])


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def is_router_bias(path) -> bool:
    return _path_name(path).endswith(ROUTER_BIAS)


def param_labels(params):
    """ "bias" for router correction biases (frozen), "decay" for matrices, "no_decay" for norm weights."""

    def label(path, x):
        if is_router_bias(path):
            return "bias"
        return "decay" if x.ndim >= 2 and not _path_name(path).endswith("weight") else "no_decay"

    return jax.tree_util.tree_map_with_path(label, params)


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's moment scaling (bias-corrected, eps outside the square root, as optax.scale_by_adam) with both
    moments stored in `dtype`: each step reads them, updates in float32 and rounds them back. The state has
    optax's ScaleByAdamState structure, so only the dtypes differ from optax.adamw's."""
    dtype = jnp.dtype(dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
        c1, c2 = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
        out = jax.tree.map(lambda m, v, g: (m / c1 / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates)
        stored = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return out, optax.ScaleByAdamState(count, stored(mu), stored(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    sched = lr_schedule(c)

    def adamw(wd):
        if c.moment_dtype == "float32":
            return optax.adamw(sched, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=wd)
        return optax.chain(
            scale_by_adam_stored_as(c.moment_dtype, c.b1, c.b2, c.eps),
            optax.add_decayed_weights(wd),
            optax.scale_by_learning_rate(sched),
        )

    inner = optax.multi_transform(
        {"decay": adamw(c.weight_decay), "no_decay": adamw(0.0), "bias": optax.set_to_zero()}, param_labels
    )
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), inner) if c.clip_norm else inner


def update_router_bias(params, counts: dict[str, jax.Array], gamma: float):
    """bias += gamma * sign(mean_load - load_e), per layer. `counts` maps a top-level params key ("moe_layers",
    "mtp_0", ...) to that segment's expert counts for the whole step ([L, E] or [E]); under jit on a global
    batch these are global counts, summed over every data shard."""
    if not gamma:
        return params

    def upd(path, x):
        seg = str(getattr(path[0], "key", path[0]))
        if not is_router_bias(path) or seg not in counts:  # e.g. MTP routers when the MTP loss is off
            return x
        c = counts[seg].astype(jnp.float32)
        return x + gamma * jnp.sign(c.mean(-1, keepdims=True) - c).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(upd, params)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)
