"""The training progress bar: it counts towards whichever limit ends the run, steps or wall time.

Most runs here are time-budgeted (``run.max_minutes``) with a step cap far beyond reach
(``run.steps: 100000``); a bar counting steps would show an ETA of hours for a run that ends in
minutes. This bar's fraction is the larger of steps done / step cap and minutes spent / budget, and
its text names both, with the measured rate and the time left by the limit that will hit first::

    autoencoder:  43%|████▎     | 3.0/7.0 min · step 1240/100000 · 6.9 steps/s · 4.0 min left (time budget)
"""
from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

_RESOLUTION = 1000  # bar units: the fraction is shown to 0.1 %
_REFRESH_SECONDS = 0.5


class TrainingProgress:
    """A tqdm bar over a run's budget, with the same ``update``/``set_postfix``/``close`` calls as tqdm.

    Args:
        budget: the run's :class:`common.training.Budget` (``steps``, ``seconds``, ``elapsed``): one clock
            for the decision to stop and for what the bar shows.
        step: the step the run starts (or resumes) at; the rate counts only this session's steps.
        desc: the bar's label.
        enabled: False draws nothing (other processes, ``run.progress: false``).
    """

    def __init__(self, budget: Any, step: int, desc: str, enabled: bool = True) -> None:
        self.budget, self.steps, self.seconds = budget, budget.steps, budget.seconds
        self.step = self.first_step = step
        self.last_refresh = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self.bar = tqdm(total=_RESOLUTION, desc=desc, unit="", disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {unit}")
        self._refresh(force=True)

    @property
    def elapsed(self) -> float:
        return self.budget.elapsed

    @property
    def rate(self) -> float:
        """Optimizer steps per second in this session."""
        return (self.step - self.first_step) / max(self.elapsed, 1e-9)

    def limit(self) -> str:
        """Which limit ends the run at the current rate: "time budget" or "step cap"."""
        if not self.seconds:
            return "step cap"
        steps_left_by_time = self.rate * max(self.seconds - self.elapsed, 0.0)
        return "time budget" if steps_left_by_time < self.steps - self.step else "step cap"

    def status(self) -> str:
        """One line: minutes of the budget, steps of the cap, rate and time left."""
        parts = [f"step {self.step}/{self.steps}", f"{self.rate:.2f} steps/s"]
        if self.seconds:
            parts.insert(0, f"{self.elapsed / 60:.1f}/{self.seconds / 60:.1f} min")
        if self.limit() == "time budget":
            left = self.seconds - self.elapsed
        else:
            left = (self.steps - self.step) / self.rate if self.rate > 0 else float("nan")
        if left == left:  # not NaN: there is a rate to extrapolate from
            parts.append(f"{max(left, 0.0) / 60:.1f} min left ({self.limit()})")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return " · ".join(parts)

    def fraction(self) -> float:
        by_steps = self.step / self.steps if self.steps > 0 else 1.0
        by_time = self.elapsed / self.seconds if self.seconds else 0.0
        return min(1.0, max(by_steps, by_time))

    def metrics(self) -> dict[str, float]:
        """For the metrics log: seconds spent, this session's steps/s and the share of the budget used."""
        return {"seconds": self.elapsed, "steps_per_second": self.rate, "budget_used": self.fraction()}

    def summary(self) -> str:
        """The closing line: steps, minutes, rate and which limit ended the run."""
        ended = "step cap run.steps" if self.step >= self.steps else "time budget run.max_minutes"
        return (f"{self.step} steps in {self.elapsed / 60:.1f} min ({self.rate:.2f} steps/s this session; "
                f"stopped by the {ended})")

    def update(self, n: int = 1) -> None:
        self.step += n
        self._refresh()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        self._refresh(force=True)

    def close(self) -> None:
        self._refresh(force=True)
        self.bar.close()

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.bar.disable or (not force and now - self.last_refresh < _REFRESH_SECONDS):
            return
        self.last_refresh = now
        self.bar.n = round(self.fraction() * _RESOLUTION)
        # The status rides in tqdm's ``unit`` field: tqdm prefixes ``{postfix}`` with ", ", and this bar shows
        # no rate, the only other place tqdm prints the unit.
        self.bar.unit = self.status()
        self.bar.refresh()
