"""The demo's closing advice: how many minutes this machine needs for the grid's steps (pure arithmetic)."""
from __future__ import annotations

from pipelines.demo import FULL_GRID_STEPS, full_grid_minutes

BUDGET = {"autoencoder": 4.5, "diffusion": 11.5}


def facts(autoencoder: tuple[int, float], diffusion: tuple[int, float]) -> dict[str, dict]:
    return {stage: {"steps": steps, "steps_per_second": rate}
            for stage, (steps, rate) in (("autoencoder", autoencoder), ("diffusion", diffusion))}


def test_a_machine_that_reached_the_grids_steps_gets_no_advice():
    assert full_grid_minutes(facts((723, 2.67), (5230, 7.56)), BUDGET) is None


def test_a_slow_machine_is_told_the_minutes_at_its_own_rates():
    # the AVX2 CPU's demo: 250 autoencoder steps at 1.11/s, 2,200 diffusion steps at 3.26/s
    needed = full_grid_minutes(facts((250, 1.11), (2200, 3.26)), BUDGET)
    assert needed == {"autoencoder": 10.0, "diffusion": 25.5}  # 650 / 1.11 s = 9.8 min, 4,950 / 3.26 s = 25.3
    assert all(needed[stage] * 60 * rate >= FULL_GRID_STEPS[stage]
               for stage, rate in (("autoencoder", 1.11), ("diffusion", 3.26)))


def test_a_stage_that_reached_its_steps_keeps_its_budget_and_a_missing_rate_gives_no_advice():
    assert full_grid_minutes(facts((900, 3.0), (2200, 3.26)), BUDGET) == {"autoencoder": 4.5, "diffusion": 25.5}
    assert full_grid_minutes(facts((250, 1.11), (0, None)), BUDGET) is None
