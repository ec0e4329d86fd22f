"""The default GRPO task: multi-digit addition, generated on the fly and checked exactly.

Prompt "123+45=", answer "168" then the stop token. Each operand first draws its digit count uniformly from
[min_digits, max_digits], then a value with that many digits, so short and long problems are equally common
(uniform values would make almost every problem max_digits long). The sum is written most significant digit
first: the first answer digit depends on every carry, which is what makes the task hard enough for a tiny
model to solve only partly after a short warm start, leaving room for GRPO.

Determinism: problem i of a stream is a function of (seed, stream, step) only, so the data state a checkpoint
needs is just the step counter. The held-out set comes from its own fixed seed (independent of the run seed)
and training draws that hit a held-out pair are redrawn, so training and evaluation never share a problem.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dsjax.rl.rewards import WeightedReward, digit_credit, digits_then_eos, exact_answer

__all__ = ["Problem", "AdditionTask", "make_task", "SFT_STREAM", "RL_STREAM", "PROBE_STREAM"]

# Independent problem streams: supervised batches, GRPO prompts, and the warm start's stopping probe.
SFT_STREAM, RL_STREAM, PROBE_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


class AdditionTask:
    name = "addition"

    def __init__(
        self, max_digits: int = 3, min_digits: int = 1, seed: int = 0, num_eval: int = 256, eval_seed: int = 1234
    ):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if num_eval < 1:
            raise ValueError(f"num_eval must be positive, got {num_eval}")
        self.max_digits, self.min_digits = max_digits, min_digits
        self.seed, self.num_eval, self.eval_seed = seed, num_eval, eval_seed

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.max_digits + 2

    @property
    def max_answer_chars(self) -> int:
        return self.max_digits + 1

    def _operands(self, rng: np.random.Generator, n: int) -> np.ndarray:
        digits = rng.integers(self.min_digits, self.max_digits + 1, size=(n, 2))
        lo = np.where(digits == 1, 0, 10 ** (digits - 1))
        return lo + (rng.random((n, 2)) * (10**digits - lo)).astype(np.int64)

    @functools.cached_property
    def _eval_pairs(self) -> np.ndarray:
        rng = np.random.default_rng(self.eval_seed)
        seen, out = set(), []
        while len(out) < self.num_eval:  # distinct pairs, so pass@1 is over num_eval different problems
            for a, b in self._operands(rng, self.num_eval).tolist():
                if (a, b) not in seen and len(out) < self.num_eval:
                    seen.add((a, b))
                    out.append((a, b))
        return np.asarray(out, np.int64)

    @functools.cached_property
    def _eval_set(self) -> frozenset:
        return frozenset(map(tuple, self._eval_pairs.tolist()))

    @staticmethod
    def _problem(a: int, b: int) -> Problem:
        return Problem(f"{a}+{b}=", str(a + b))

    def eval_problems(self) -> list[Problem]:
        return [self._problem(a, b) for a, b in self._eval_pairs.tolist()]

    def problems(self, stream: int, step: int, n: int) -> list[Problem]:
        """n training problems for (stream, step); never a held-out one."""
        rng = np.random.default_rng([self.seed, stream, step])
        out: list[Problem] = []
        while len(out) < n:
            for a, b in self._operands(rng, n - len(out)).tolist():
                if (a, b) not in self._eval_set:
                    out.append(self._problem(a, b))
        return out

    def rewards(self, weights: dict[str, float]) -> list[WeightedReward]:
        """The task's reward functions with the given weights (a weight of 0 leaves a function out)."""
        fns = {"correct": exact_answer, "format": digits_then_eos, "digits": digit_credit}
        unknown = set(weights) - set(fns)
        if unknown:
            raise ValueError(f"unknown reward(s) {sorted(unknown)} for task {self.name!r}; known: {sorted(fns)}")
        return [WeightedReward(k, fns[k], float(w)) for k, w in weights.items() if w]


TASKS = {"addition": AdditionTask}


def make_task(name: str, seed: int, **kw):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](seed=seed, **kw)
