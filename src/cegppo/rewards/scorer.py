"""RewardScorer: one score per response, with failures and timeouts scored as wrong and counted."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from math_verify.errors import TimeoutException

from cegppo.rewards.config import RewardConfig
from cegppo.rewards.functions import absolute_reward_name, call_reward, resolve_reward_function
from cegppo.rewards.workers import WorkerPool

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    """Scores of one batch of responses.

    ``num_errors`` counts responses whose reward raised, returned something that is not a finite score, or whose
    worker died; ``num_timeouts`` counts those that ran past ``timeout_s``. The two are disjoint, and all of them
    score ``incorrect_score`` with ``correct`` False. ``errors[i]`` says why response ``i`` failed (None if it did
    not), ``first_error`` is the first raised exception; ``extras[i]`` holds the non-``score`` entries of a dict
    returned by a custom reward.
    """

    scores: list[float]
    correct: list[bool]
    num_errors: int = 0
    num_timeouts: int = 0
    errors: list[str | None] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    first_error: str | None = None

    @classmethod
    def concat(cls, results: list[RewardResult]) -> RewardResult:
        """One result for several batches scored in turn (e.g. the generation rounds of one training step)."""
        return cls(
            scores=[score for result in results for score in result.scores],
            correct=[flag for result in results for flag in result.correct],
            num_errors=sum(result.num_errors for result in results),
            num_timeouts=sum(result.num_timeouts for result in results),
            errors=[error for result in results for error in result.errors],
            extras=[extra for result in results for extra in result.extras],
            elapsed_s=sum(result.elapsed_s for result in results),
            first_error=next((r.first_error for r in results if r.first_error is not None), None),
        )

    def metrics(self) -> dict[str, float]:
        """``reward/mean`` and ``acc/mean`` (omitted for an empty batch), ``reward/{errors,timeouts}`` (counts),
        and ``reward/extra/<key>``: the mean of each numeric extra entry over the responses
        that returned it."""
        out: dict[str, float] = {}
        if self.scores:
            out["reward/mean"] = sum(self.scores) / len(self.scores)
            out["acc/mean"] = sum(self.correct) / len(self.correct)
        out["reward/errors"] = float(self.num_errors)
        out["reward/timeouts"] = float(self.num_timeouts)
        values: dict[str, list[float]] = {}
        for extra in self.extras:
            for key, value in extra.items():
                values.setdefault(key, []).append(value)
        for key, vals in sorted(values.items()):
            if all(isinstance(v, (int, float)) for v in vals):
                out[f"reward/extra/{key}"] = float(sum(vals)) / len(vals)
        return out


class RewardScorer:
    """Scores responses with the reward named in ``cfg``.

    The config is validated and a custom function is imported at construction, so a bad name fails before
    training starts (ValueError). With ``num_workers >= 1`` the worker processes start here too (in the
    background); use the scorer as a context manager or call ``close()``. Not thread-safe: call ``score`` from one
    thread at a time.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self._fn = resolve_reward_function(cfg)
        portable = dataclasses.replace(cfg, name=absolute_reward_name(cfg.name))
        self._pool = WorkerPool(portable, cfg.num_workers) if cfg.num_workers > 0 else None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes; the scorer cannot be used afterwards."""
        if self._pool is not None:
            self._pool.close()

    def score(
        self,
        responses: list[str],
        ground_truths: list[str],
        data_sources: list[str] | None = None,
        extra_infos: list[dict] | None = None,
    ) -> RewardResult:
        """Score ``responses[i]`` against ``ground_truths[i]``. ``data_sources`` defaults to ``""`` and
        ``extra_infos`` to None for every response (they are passed to custom rewards as in verl)."""
        n = len(responses)
        named = {"ground_truths": ground_truths, "data_sources": data_sources, "extra_infos": extra_infos}
        for key, values in named.items():
            if values is not None and len(values) != n:
                raise ValueError(f"{key} has {len(values)} entries but responses has {n}")
        sources = data_sources if data_sources is not None else [""] * n
        infos = extra_infos if extra_infos is not None else [None] * n
        items = [(i, sources[i], responses[i], ground_truths[i], infos[i]) for i in range(n)]

        start = time.perf_counter()
        if self._pool is None:
            answers = {item[0]: self._score_here(*item) for item in items}
        else:
            answers = self._pool.run(items, self.cfg.timeout_s)
        result = RewardResult(scores=[], correct=[])
        for i in range(n):
            answer = answers[i]
            if answer[0] == "ok":
                result.scores.append(answer[2])
                result.correct.append(answer[3])
                result.errors.append(None)
                result.extras.append(answer[4])
                continue
            result.scores.append(float(self.cfg.incorrect_score))
            result.correct.append(False)
            result.errors.append(answer[2])
            result.extras.append({})
            if answer[0] == "timeout":
                result.num_timeouts += 1
            else:
                result.num_errors += 1
                result.first_error = result.first_error or answer[2]
        result.elapsed_s = time.perf_counter() - start
        failed = [e for e in result.errors if e is not None]
        if failed:
            logger.warning(
                "reward %r: %d errors and %d timeouts in %d responses (first: %s)",
                self.cfg.name,
                result.num_errors,
                result.num_timeouts,
                n,
                failed[0],
            )
        return result

    def _score_here(
        self, index: int, data_source: str, response: str, ground_truth: str, extra_info: Any
    ) -> tuple:
        try:
            outcome = call_reward(self._fn, self.cfg, data_source, response, ground_truth, extra_info)
        except (Exception, TimeoutException, SystemExit) as exc:  # a reward must never end the run
            return ("error", index, f"{type(exc).__name__}: {exc}")
        return ("ok", index, outcome.score, outcome.correct, outcome.extras)
