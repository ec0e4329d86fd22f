"""Rule-based rewards (DeepSeek-R1 style): a list of weighted functions, each scoring one completion.

A reward function is any callable `fn(sample: Sample) -> float`. `score` calls every function on every sample
and sums the weighted results. A function that raises (or returns something that is not a finite number)
scores 0 for that sample and is counted in the step's metrics rather than stopping training: rewards run on
model output, which is arbitrary text, and one unparsable completion must not kill a long run. The count makes
a systematically broken reward visible (reward/<name>/errors stays high) instead of silently zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["Sample", "WeightedReward", "Scores", "score", "exact_answer", "digit_credit", "digits_then_eos"]


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: str  # the task's prompt text (without special tokens)
    completion: str  # decoded completion, special tokens (the stop token) removed
    answer: str | None  # the task's reference answer
    finished: bool  # ended with a stop token; False: cut off at max_new_tokens


@dataclasses.dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: Callable[[Sample], float]
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Scores:
    total: np.ndarray  # [B] float32 weighted sum over functions
    per_fn: dict[str, np.ndarray]  # name -> [B] float32 unweighted scores (0 where the function failed)
    errors: dict[str, int]  # name -> samples on which the function failed
    first_error: dict[str, str]  # name -> the first failure's message (for the log)

    def metrics(self) -> dict[str, float]:
        out = {"reward/mean": float(self.total.mean()), "reward/std": float(self.total.std())}
        for name, v in self.per_fn.items():
            out[f"reward/{name}/mean"] = float(v.mean())
            out[f"reward/{name}/std"] = float(v.std())
            out[f"reward/{name}/errors"] = float(self.errors[name])
        return out


def score(rewards: Sequence[WeightedReward], samples: Sequence[Sample]) -> Scores:
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique (they key the metrics), got {names}")
    total = np.zeros(len(samples), np.float32)
    per_fn, errors, first = {}, {}, {}
    for r in rewards:
        vals = np.zeros(len(samples), np.float32)
        errors[r.name] = 0
        for i, s in enumerate(samples):
            try:
                v = float(r.fn(s))
                if not math.isfinite(v):
                    raise ValueError(f"non-finite reward {v}")
            except Exception as e:  # noqa: BLE001 - any failure on model output scores 0 and is counted
                errors[r.name] += 1
                first.setdefault(r.name, f"{type(e).__name__}: {e}")
                continue
            vals[i] = v
        per_fn[r.name] = vals
        total += np.float32(r.weight) * vals
    return Scores(total, per_fn, errors, first)


_DIGITS = re.compile(r"\d+")


def exact_answer(s: Sample) -> float:
    """1 when the completion is exactly the answer and the model ended it itself."""
    return float(s.finished and s.completion == s.answer)


def digits_then_eos(s: Sample) -> float:
    """Format: one or more digits, then the stop token (nothing else, no truncation)."""
    return float(s.finished and _DIGITS.fullmatch(s.completion) is not None)


def digit_credit(s: Sample) -> float:
    """Partial credit: the fraction of digit places (units first) that match the answer; a wrong length costs
    the missing or extra places. Dense signal for groups whose exact-match rewards are all 0."""
    if s.answer is None:
        raise ValueError("digit_credit needs the task's answer")
    if _DIGITS.fullmatch(s.completion) is None:
        return 0.0
    got, want = s.completion[::-1], s.answer[::-1]
    hits = sum(a == b for a, b in zip(got, want))
    return hits / max(len(got), len(want))
