"""dsjax.rl.grpo against a plain NumPy (float64, loops) reference written from the GRPO/DAPO/Dr. GRPO papers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.rl.grpo import group_advantages, policy_loss

LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]
STD_EPS = 1e-4


# ---------------------------------------------------------------- NumPy reference


def np_advantages(rewards: np.ndarray, g: int, scale: str) -> np.ndarray:
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    batch_std = np.std(r, ddof=1) if len(r) > 1 else 0.0
    for start in range(0, len(r), g):
        grp = r[start : start + g]
        if np.all(grp == grp[0]):
            continue
        mean = sum(grp) / g
        for i, x in enumerate(grp):
            a = x - mean
            if scale == "group":
                a /= math.sqrt(sum((y - mean) ** 2 for y in grp) / (g - 1)) + STD_EPS
            elif scale == "batch":
                a /= batch_std + STD_EPS
            out[start + i] = a
    return out


def np_policy_loss(lp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len=None):
    """Returns (loss, metrics, d loss / d lp), the gradient worked out by hand per token."""
    B, T = mask.shape
    tokens = [[t for t in range(T) if mask[b, t] > 0] for b in range(B)]
    n_tok = sum(len(ts) for ts in tokens)
    n_seq = sum(1 for ts in tokens if ts)
    loss, grad = 0.0, np.zeros((B, T))
    kl = low = high = rho_sum = 0.0
    rhos = []
    for b in range(B):
        a = float(adv[b])
        for t in tokens[b]:
            rho = math.exp(lp[b, t] - old[b, t])
            unclipped, clipped = rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a
            value = -min(unclipped, clipped)
            # The clipped branch is a constant; only the unclipped branch carries gradient.
            d = -rho * a if unclipped <= clipped else 0.0
            if ref is not None:
                k3 = math.exp(ref[b, t] - lp[b, t]) - (ref[b, t] - lp[b, t]) - 1
                kl += k3 / n_tok
                value += beta * k3
                d += beta * (1 - math.exp(ref[b, t] - lp[b, t]))
            if loss_type == "grpo":
                w = 1.0 / (len(tokens[b]) * n_seq)
            elif loss_type == "dapo":
                w = 1.0 / n_tok
            else:
                w = 1.0 / (B * (max_len or T))
            loss += w * value
            grad[b, t] = w * d
            low += (a < 0 and rho < 1 - eps_low) / n_tok
            high += (a > 0 and rho > 1 + eps_high) / n_tok
            rho_sum += rho / n_tok
            rhos.append(rho)
    metrics = {
        "kl": kl,
        "clip_ratio/low": low,
        "clip_ratio/high": high,
        "clip_ratio/region": low + high,
        "ratio/mean": rho_sum,
        "ratio/min": min(rhos),
        "ratio/max": max(rhos),
        "advantage/mean": float(np.mean(adv)),
    }
    return loss, metrics, grad


def make_inputs(seed: int, B: int = 6, T: int = 12, empty_row: bool = True):
    """Log-probs whose ratios sit in three bands well away from every clip edge used below."""
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (B, T))
    band = rng.integers(0, 3, (B, T))
    delta = np.choose(
        band, [rng.uniform(-1.0, -0.5, (B, T)), rng.uniform(-0.05, 0.05, (B, T)), rng.uniform(0.45, 1.0, (B, T))]
    )
    delta[0, :3], delta[1, :3] = -0.8, 0.7  # with adv[:2] below: both clip sides bite whatever the seed
    lp = old + delta
    ref = lp + rng.normal(0.0, 0.3, (B, T))
    adv = rng.choice([-1.0, 1.0], B) * rng.uniform(0.3, 2.0, B)
    adv[:2] = [-1.3, 0.7]
    lengths = rng.integers(1, T + 1, B)
    lengths[:2] = T
    if empty_row:
        lengths[2] = 0
    start = rng.integers(0, T - lengths + 1)
    mask = np.zeros((B, T))
    for b in range(B):
        mask[b, start[b] : start[b] + lengths[b]] = 1
    # Padding holds garbage; it must be ignored, not turned into NaN.
    lp, old, ref = np.where(mask > 0, lp, 30.0), np.where(mask > 0, old, -np.inf), np.where(mask > 0, ref, np.nan)
    return lp, old, ref, adv, mask


def f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def jax_loss_and_grad(lp, old, ref, adv, mask, **kw):
    fn = lambda x: policy_loss(x, *f32(old, ref, adv, mask), **kw)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(*f32(lp))
    return loss, metrics, grad


# ---------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_advantages_matches_numpy(scale, seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(0, 2, 18).astype(np.float32)
    rewards[3:6] = 0.1  # all-equal group; the float32 mean of three 0.1s is not 0.1
    rewards[12:15] = rng.integers(0, 2, 3)  # binary rewards as from a verifier
    got = np.asarray(group_advantages(jnp.asarray(rewards), 3, scale=scale))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np_advantages(rewards, 3, scale), rtol=1e-5, atol=1e-6)
    assert np.all(got[3:6] == 0.0)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("rewards,g", [([1.0, 2.0, 3.0], 1), ([0.1] * 6, 3), ([5.0], 1), ([2.9] * 3, 3)])
def test_group_advantages_degenerate_groups_are_zero(scale, rewards, g):
    got = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), g, scale=scale))
    assert got.shape == (len(rewards),)
    assert np.all(got == 0.0)


def test_group_advantages_under_jit():
    rewards = jnp.asarray(np.random.default_rng(3).normal(size=12), jnp.float32)
    fn = jax.jit(group_advantages, static_argnums=(1, 2))
    np.testing.assert_allclose(fn(rewards, 3, "batch"), np_advantages(np.asarray(rewards), 3, "batch"), rtol=1e-5)


@pytest.mark.parametrize("n,g", [(7, 3), (4, 0), (6, -2)])
def test_group_advantages_bad_group_size(n, g):
    with pytest.raises(ValueError, match=rf"length {n}\b.*group_size {g}\b"):
        group_advantages(jnp.zeros(n), g)


def test_group_advantages_unknown_scale():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(jnp.zeros(4), 2, scale="std")


# ---------------------------------------------------------------- policy_loss

SETTINGS = [  # eps_low, eps_high, beta, max_completion_length, pass ref
    (0.2, 0.2, 0.04, None, True),
    (0.2, 0.28, 0.1, None, True),  # DAPO clip-higher
    (0.1, 0.3, 0.0, 20, False),  # no KL, no reference model
    (0.2, 0.2, 0.0, 16, True),  # ref passed but beta 0: KL only reported
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_low,eps_high,beta,max_len,with_ref", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_numpy(loss_type, eps_low, eps_high, beta, max_len, with_ref, seed):
    lp, old, ref, adv, mask = make_inputs(seed)
    ref = ref if with_ref else None
    kw = dict(loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, max_completion_length=max_len)
    want, want_metrics, want_grad = np_policy_loss(lp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len)
    assert want_metrics["clip_ratio/low"] > 0 and want_metrics["clip_ratio/high"] > 0  # both clip sides exercised

    loss, metrics, grad = jax_loss_and_grad(lp, old, ref, adv, mask, **kw)
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    assert set(want_metrics) <= set(metrics)
    for name, value in want_metrics.items():
        assert metrics[name].shape == () and metrics[name].dtype == jnp.float32, name
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_numpy_reference_gradient_is_the_finite_difference(loss_type):
    # Guards the hand-written reference gradient itself: central differences in float64.
    lp, old, ref, adv, mask = make_inputs(5, B=4, T=6)
    args = (old, ref, adv, mask, loss_type, 0.2, 0.28, 0.04)
    _, _, grad = np_policy_loss(lp, *args)
    h, fd = 1e-6, np.zeros_like(grad)
    for b, t in zip(*np.nonzero(mask)):
        up, down = lp.copy(), lp.copy()
        up[b, t] += h
        down[b, t] -= h
        fd[b, t] = (np_policy_loss(up, *args)[0] - np_policy_loss(down, *args)[0]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_on_policy_gradient_is_minus_advantage_times_weight(loss_type, beta):
    lp, _, _, adv, mask = make_inputs(7)
    lp = np.where(mask > 0, lp, 0.0)
    B, T = mask.shape
    lengths = mask.sum(1)
    weight = {
        "grpo": mask / np.maximum(lengths, 1)[:, None] / np.count_nonzero(lengths),
        "dapo": mask / mask.sum(),
        "dr_grpo": mask / (B * T),
    }[loss_type]
    # ref == lp: k3 and its gradient vanish, so beta must not change anything.
    loss, metrics, grad = jax_loss_and_grad(lp, lp, lp if beta else None, adv, mask, loss_type=loss_type, beta=beta)
    np.testing.assert_allclose(grad, -adv[:, None] * weight, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loss, -(adv[:, None] * weight).sum(), rtol=1e-5, atol=1e-7)
    for name in ["clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "kl"]:
        assert metrics[name] == 0.0, name
    for name in ["ratio/mean", "ratio/min", "ratio/max"]:
        assert metrics[name] == 1.0, name


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_only_logprobs_get_gradient(loss_type):
    lp, old, ref, adv, mask = (np.nan_to_num(x, posinf=0.0, neginf=0.0) for x in make_inputs(3))
    fn = lambda *xs: policy_loss(*xs, jnp.asarray(mask, jnp.float32), loss_type=loss_type)[0]
    grads = jax.grad(fn, argnums=(0, 1, 2, 3))(*f32(lp, old, ref, adv))
    assert np.any(np.asarray(grads[0]) != 0)
    for g in grads[1:]:
        assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_batch_gives_zero_not_nan(loss_type):
    lp, old, ref, adv, mask = make_inputs(4)
    loss, metrics, grad = jax_loss_and_grad(lp, old, ref, adv, np.zeros_like(mask), loss_type=loss_type)
    assert loss == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    for name, value in metrics.items():
        assert np.isfinite(value), name


def test_grpo_excludes_fully_masked_sequences():
    lp, old, ref, adv, mask = make_inputs(6)
    assert mask[2].sum() == 0
    loss = lambda m: float(policy_loss(*f32(lp, old, ref, adv, m), loss_type="grpo", epsilon_high=0.28)[0])
    per_seq = []  # each sequence's own token mean: the loss with only that row unmasked
    for b in range(mask.shape[0]):
        only_b = np.zeros_like(mask)
        only_b[b] = mask[b]
        per_seq.append(loss(only_b))
    assert per_seq[2] == 0.0
    nonempty = [x for b, x in enumerate(per_seq) if b != 2]
    np.testing.assert_allclose(loss(mask), np.mean(nonempty), rtol=1e-5)
    assert not np.isclose(loss(mask), np.sum(per_seq) / len(per_seq), rtol=1e-3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_under_jit(loss_type):
    lp, old, ref, adv, mask = f32(*make_inputs(8))
    kw = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=32)
    eager = policy_loss(lp, old, ref, adv, mask, **kw)
    jitted = jax.jit(functools.partial(policy_loss, **kw))(lp, old, ref, adv, mask)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    for name in eager[1]:
        np.testing.assert_allclose(jitted[1][name], eager[1][name], rtol=1e-6, err_msg=name)
    no_ref = jax.jit(functools.partial(policy_loss, loss_type=loss_type, beta=0.0))(lp, old, None, adv, mask)
    assert no_ref[1]["kl"] == 0.0


def test_policy_loss_errors():
    x, a, m = jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'.*grpo, dapo, dr_grpo"):
        policy_loss(x, x, x, a, m, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, None, a, m, beta=0.04)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, x, x, a, m, loss_type="dr_grpo", max_completion_length=0)
