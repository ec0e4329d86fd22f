"""Training plumbing shared by the pretraining trainer (dsjax/train/trainer.py) and the GRPO trainer
(dsjax/rl/trainer.py): the config's model section, a clean stop on SIGTERM / Ctrl-C, the resume check (same model?),
the optimizer step and gradient norm used inside the jitted steps, and jitting those steps with or without a mesh.

    cfg = model_config(config)                          # the config's `model` section -> ModelConfig
    restored = ckpt.restore_latest(params, opt_state, ResumeCheck(cfg, workdir))  # None: a fresh run
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
from dsjax.errors import CheckpointError, ConfigError
from dsjax.model import DeepSeekV3
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.checkpoint_io import config_mismatch, model_config_from_dict
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
            raise ConfigError(f"model override {name!r} is not a ModelConfig field")
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


def check_counts(config, section: str, positive=(), nonnegative=()) -> None:
    """ConfigError naming `--config.<section>.<field>` for any listed count that is out of range (before anything
    compiles: a zero interval would otherwise fail with ZeroDivisionError after the first step)."""
    values = config[section]
    for name, low in [(f, 1) for f in positive] + [(f, 0) for f in nonnegative]:
        v = values[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"--config.{section}.{name}={v!r} must be an integer >= {low}")


# The data settings a checkpoint's data-iterator position is only meaningful for.
DATA_FIELDS = ("spec", "eval_spec", "tokenizer", "seq_len", "batch_size", "add_bos")


def data_changes(saved_experiment: dict, config) -> list[str]:
    """The data settings (and the data seed) that differ between a checkpoint's run and this one, as
    '--config.data.spec: checkpoint 'stdlib' vs now 'x.txt'' strings."""
    old_data, out = saved_experiment.get("data", {}), []
    for name in DATA_FIELDS:
        if name in old_data and old_data[name] != config.data[name]:
            out.append(f"--config.data.{name}: checkpoint {old_data[name]!r} vs now {config.data[name]!r}")
    old_seed = saved_experiment.get("train", {}).get("seed", config.train.seed)
    if old_seed != config.train.seed:
        out.append(f"--config.train.seed: checkpoint {old_seed!r} vs now {config.train.seed!r}")
    return out


class ResumeCheck:
    """Whether a checkpoint may be resumed by this run (the `check_config` of Checkpointer.restore_latest): the same
    model architecture (runtime knobs such as dtype, remat or kernels may change) and, when `config` is given (a
    pretraining run, whose checkpoints record a data position), the same data settings unless `allow_data_change`.
    Raises ConfigError naming the differing fields; `data_changed` lists the data changes it let through."""

    def __init__(self, cfg: ModelConfig, workdir: str, config=None, allow_data_change: bool = False):
        self.cfg, self.workdir, self.config, self.allow = cfg, workdir, config, allow_data_change
        self.data_changed: list[str] = []

    def __call__(self, saved: dict) -> None:
        diff = config_mismatch(model_config_from_dict(saved["model"]), self.cfg)
        if diff:
            raise ConfigError(
                f"{self.workdir}: its checkpoint was written with a different model config; use a new --workdir or "
                "the old config. Differences: " + "; ".join(diff)
            )
        if self.config is None:
            return
        self.data_changed = data_changes(saved.get("experiment", {}), self.config)
        if self.data_changed and not self.allow:
            raise ConfigError(
                f"{self.workdir}: its checkpoint was written with other data settings, so its data position means "
                "nothing now: " + "; ".join(self.data_changed) + ". Resume with those, use a new --workdir, or set "
                "--config.train.allow_data_change=True to continue with the new data from its start"
            )

    def early(self, ckpt: Checkpointer) -> None:
        """The check against the newest checkpoint whose config reads, before any expensive work (a corrupt step is
        skipped here; restore_latest moves it aside later)."""
        for step in reversed(ckpt.all_steps()):
            try:
                saved = ckpt.read_config(step)
            except CheckpointError:
                continue
            self(saved)
            return


def apply_optimizer(tx: optax.GradientTransformation, grads, opt_state, params):
    """One optimizer step inside a jitted update: (new params, new optimizer state). `optax.apply_updates` keeps
    each parameter's dtype, so float32 updates never promote low-precision parameters."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def guarded_update(tx: optax.GradientTransformation, grads, opt_state, params, loss, after=None):
    """One optimizer step that is not applied when the loss or the gradient norm is not finite (a diverging or
    corrupted step must not reach the parameters, the moments or a checkpoint). `after(new_params)` runs on the
    updated params before the choice (the router-bias update). Returns (params, opt_state, grad norm, skipped).

    The choice is an elementwise select that XLA fuses into the optimizer's own pass: no extra traffic."""
    gnorm = grad_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    new_params, new_state = apply_optimizer(tx, grads, opt_state, params)
    if after is not None:
        new_params = after(new_params)
    chosen = jax.tree.map(lambda n, o: jnp.where(ok, n, o), (new_params, new_state), (params, opt_state))
    return (*chosen, gnorm, jnp.logical_not(ok))


class NonFiniteGuard:
    """Host side of `guarded_update`: prints each skipped step and stops the run after `limit` in a row."""

    def __init__(self, limit: int, flag: str):
        if limit < 1:
            raise ConfigError(f"{flag}={limit} must be >= 1")
        self.limit, self.flag, self.in_a_row, self.total = limit, flag, 0, 0

    def observe(self, step: int, skipped) -> None:
        """`skipped` is the step's device flag; raises ConfigError once `limit` steps in a row were skipped."""
        if not bool(skipped):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        print(f"step {step}: loss or gradient norm not finite; update skipped ({self.in_a_row} in a row)", flush=True)
        if self.in_a_row >= self.limit:
            raise ConfigError(
                f"training diverged: {self.in_a_row} steps in a row up to step {step} had a non-finite loss or "
                f"gradient norm, so none was applied and no such state was saved; lower --config.optim.lr or check "
                f"the data, then resume (the limit is {self.flag})"
            )


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
