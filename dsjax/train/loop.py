"""Training plumbing shared by the pretraining trainer (dsjax/train/trainer.py) and the GRPO trainer
(dsjax/rl/trainer.py): the config's model section, a clean stop on SIGTERM / Ctrl-C, the resume check (same model?),
the optimizer step and gradient norm used inside the jitted steps, and jitting those steps with or without a mesh.

    cfg = model_config(config)                          # the config's `model` section -> ModelConfig
    resume = checked_resume_step(ckpt, cfg, workdir)    # None: fresh run; raises if the checkpoint's model differs
    step = jit_train_step(fn, cfg, tx, mesh, extra_outputs=1)    # fn(params, opt_state, ...) -> (params, opt_state, m)
    stop = StopFlag()                                   # ... while not stop.requested: ... finally: stop.restore()
"""

from __future__ import annotations

import dataclasses
import signal

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsjax.config import ModelConfig
from dsjax.model import DeepSeekV3
from dsjax.train.checkpoint import Checkpointer, config_mismatch, model_config_from_dict
from sharding.state import bind, replicated, state_shardings

# rope_scaling is a dict and the token ids are the tokenizer's business: neither is a command-line override
_OVERRIDABLE = {
    f.name: f.type
    for f in dataclasses.fields(ModelConfig)
    if f.name not in ("rope_scaling", "eos_token_id", "bos_token_id")
}


def model_config_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """The `model` config section: a preset name plus every ModelConfig field as an optional override, so any
    field can be set from the command line (--config.model.num_hidden_layers=4); None keeps the preset's value."""
    types = {"int": int, "float": float, "bool": bool, "str": str, "int | None": int}
    c = ml_collections.ConfigDict({"preset": preset})
    for name, typ in _OVERRIDABLE.items():
        c[name] = ml_collections.config_dict.placeholder(types[typ])
    for name, value in overrides.items():
        if name not in _OVERRIDABLE:
            raise ValueError(f"model override {name!r} is not a ModelConfig field")
        c[name] = value
    return c


def model_config(config) -> ModelConfig:
    """The ModelConfig a run's config asks for: its `model` section's preset with the fields it sets."""
    fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    return ModelConfig.preset(config.model.preset, **fields)


def to_plain(x):
    """A ConfigDict (or nested dicts / lists of them) as plain dicts and lists: what JSON checkpoints and
    dataclass constructors take."""
    if hasattr(x, "to_dict"):
        return to_plain(x.to_dict())
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


class StopFlag:
    """SIGTERM / first Ctrl-C request a clean stop (checkpoint, then exit); a second Ctrl-C interrupts.

    A training loop checks `requested` between steps, so a stop never lands in the middle of an update; call
    `restore()` when the loop ends to put the previous handlers back."""

    def __init__(self):
        self.signum = None
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint and stopping", flush=True)

    def restore(self):
        """Puts back the signal handlers that were installed before this flag."""
        for s, h in self._old.items():
            signal.signal(s, h)


def checked_resume_step(ckpt: Checkpointer, cfg: ModelConfig, workdir: str) -> int | None:
    """The step to resume from (None: no checkpoint, a fresh run), once the checkpoint is known to hold the same
    model: its architecture must equal `cfg`'s, while runtime knobs (dsjax.config.RUNTIME_FIELDS: dtype, remat,
    kernels, ...) may change across a resume. Call it before anything is written; on a mismatch it closes `ckpt`
    and raises ValueError naming the differing fields."""
    step = ckpt.latest_step()
    if step is None:
        return None
    diff = config_mismatch(model_config_from_dict(ckpt.read_config(step)["model"]), cfg)
    if diff:
        ckpt.close()
        raise ValueError(
            f"{workdir}: the checkpoint at step {step} was written with a different model config; use a "
            "new --workdir or the old config. Differences: " + "; ".join(diff)
        )
    return step


def apply_optimizer(tx: optax.GradientTransformation, grads, opt_state, params):
    """One optimizer step inside a jitted update: (new params, new optimizer state). `optax.apply_updates` keeps
    each parameter's dtype, so float32 updates never promote low-precision parameters."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def grad_norm(grads) -> jax.Array:
    """The gradient tree's global L2 norm (a logged metric), summed in float32: bfloat16 squares summed in
    bfloat16 would lose most of the digits of a large model's norm."""
    return optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))


def init_params(cfg: ModelConfig, seed: int, shardings=None):
    """Parameters created in place: with shardings, each device only ever holds its own shards."""
    model = DeepSeekV3(cfg)
    return jax.jit(
        lambda: model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"], out_shardings=shardings
    )()


def jit_train_step(fn, cfg: ModelConfig, tx: optax.GradientTransformation, mesh=None, *, extra_outputs: int):
    """`fn(params, opt_state, ...) -> (params, opt_state, *extra)` jitted, donating params and optimizer state.

    With a mesh, the state comes back in its rule-table layout (sharding/rules.py; the optimizer state follows
    its parameters), the `extra_outputs` others (metrics, ...) replicated, and the step traces with the mesh bound
    (sharding/state.py), which the expert-parallel MoE path needs."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0, 1))
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    pshard, oshard = state_shardings(mesh, shapes, jax.eval_shape(tx.init, shapes))
    outs = (pshard, oshard) + (replicated(mesh),) * extra_outputs
    return bind(mesh, jax.jit(fn, donate_argnums=(0, 1), out_shardings=outs))


def jit_forward(fn, mesh=None, *, replicate_outputs: bool = False):
    """A function that updates no state (an eval or log-prob forward) jitted, with a mesh traced with it bound.
    `replicate_outputs` puts every output whole on each device (scalars the host reads); otherwise the compiler
    keeps them where they fall (per-row outputs that feed the next step stay split over the batch)."""
    if mesh is None:
        return jax.jit(fn)
    return bind(mesh, jax.jit(fn, out_shardings=replicated(mesh)) if replicate_outputs else jax.jit(fn))


def save_due(step: int, total_steps: int, save_every: int) -> bool:
    """Whether a loop checkpoints after `step`: every `save_every` steps, and after the last one."""
    return step % save_every == 0 or step == total_steps
