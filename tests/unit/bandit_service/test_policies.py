"""Allocation policies against their formulas, against scipy, and by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from bandit_service.policies import ArmStats, PolicyConfig, PolicyInputError, allocate, apply_floor
from bandit_service.simulation import simulate_regret


def arms(*specs) -> list[ArmStats]:
    return [ArmStats(name, weight, n, r, r2) for name, weight, n, r, r2 in specs]


TWO = arms(("A", 0.5, 1000, 45.0, 45.0), ("B", 0.5, 800, 50.0, 50.0))


def test_weighted_sampling_is_the_normalised_initial_weights():
    result = allocate(arms(("A", 3, 10, 1, 1), ("B", 1, 10, 9, 9)), PolicyConfig("WeightedSampling"))
    assert result.weights == {"A": 0.75, "B": 0.25}


@pytest.mark.parametrize("strategy", ["EpsilonGreedy", "UCB1", "ThompsonSampling"])
def test_warmup_serves_initial_weights_until_every_arm_has_enough(strategy):
    data = arms(("A", 2, 500, 10, 10), ("B", 1, 99, 90, 90))
    result = allocate(data, PolicyConfig(strategy, warmup=100))
    assert result.phase == "warmup"
    assert result.weights == pytest.approx({"A": 2 / 3, "B": 1 / 3})
    assert allocate(data, PolicyConfig(strategy, warmup=99)).phase == strategy


def test_epsilon_greedy_formula_and_ties():
    result = allocate(TWO, PolicyConfig("EpsilonGreedy", epsilon=0.1))
    assert result.weights == pytest.approx({"A": 0.05, "B": 0.95})  # B's mean 0.0625 beats A's 0.045
    tie = allocate(arms(("A", 1, 100, 5, 5), ("B", 1, 200, 10, 10), ("C", 1, 100, 1, 1)),
                   PolicyConfig("EpsilonGreedy", epsilon=0.3))
    assert tie.weights == pytest.approx({"A": 0.1 + 0.35, "B": 0.1 + 0.35, "C": 0.1})


def test_ucb1_scores_match_the_formula():
    data = arms(("A", 1, 100, 30, 30), ("B", 1, 10, 2, 2), ("C", 1, 50, 20, 20))
    result = allocate(data, PolicyConfig("UCB1"))
    total = 160
    expected = {a.name: a.reward_sum / a.invocations + math.sqrt(2 * math.log(total) / a.invocations) for a in data}
    assert result.detail["scores"] == pytest.approx(expected)
    best = max(expected, key=expected.get)
    assert best == "B"  # the least tried arm has the widest bound
    assert result.weights == {"A": 0.0, "B": 1.0, "C": 0.0}


def test_ucb1_tries_untried_arms_first():
    result = allocate(arms(("A", 1, 100, 90, 90), ("B", 1, 0, 0, 0), ("C", 1, 0, 0, 0)), PolicyConfig("UCB1"))
    assert result.weights == {"A": 0.0, "B": 0.5, "C": 0.5}


def exact_p_b_beats_a(a: ArmStats, b: ArmStats) -> float:
    pa = stats.beta(1 + a.reward_sum, 1 + a.invocations - a.reward_sum)
    pb = stats.beta(1 + b.reward_sum, 1 + b.invocations - b.reward_sum)
    lo = min(pa.ppf(1e-9), pb.ppf(1e-9))
    hi = max(pa.ppf(1 - 1e-9), pb.ppf(1 - 1e-9))
    value, _ = integrate.quad(lambda x: pb.pdf(x) * pa.cdf(x), lo, hi, limit=200, points=[pa.mean(), pb.mean()])
    return value


@pytest.mark.parametrize("data", [
    TWO,
    arms(("A", 1, 20, 1, 1), ("B", 1, 25, 3, 3)),
    arms(("A", 1, 10_000, 450, 450), ("B", 1, 10_000, 520, 520)),
    arms(("A", 1, 0, 0, 0), ("B", 1, 0, 0, 0)),
])
def test_thompson_weights_are_the_posterior_probability_of_being_best(data):
    result = allocate(data, PolicyConfig("ThompsonSampling"))
    exact = exact_p_b_beats_a(*data)
    # 20,000 Monte Carlo draws: standard error <= 0.0036
    assert result.weights["B"] == pytest.approx(exact, abs=0.015)
    assert sum(result.weights.values()) == pytest.approx(1.0)


def test_thompson_gaussian_rewards_match_the_normal_closed_form():
    rng = np.random.default_rng(4)
    a_rewards, b_rewards = rng.normal(10.0, 4.0, 400), rng.normal(10.6, 5.0, 300)
    data = [ArmStats("A", 1, 400, float(a_rewards.sum()), float((a_rewards ** 2).sum())),
            ArmStats("B", 1, 300, float(b_rewards.sum()), float((b_rewards ** 2).sum()))]
    result = allocate(data, PolicyConfig("ThompsonSampling", reward_model="gaussian"))
    se = math.sqrt(a_rewards.var(ddof=1) / 400 + b_rewards.var(ddof=1) / 300)
    exact = stats.norm.cdf((b_rewards.mean() - a_rewards.mean()) / se)
    assert result.weights["B"] == pytest.approx(exact, abs=0.015)


def test_thompson_is_reproducible_and_seeded():
    first = allocate(TWO, PolicyConfig("ThompsonSampling", seed=1)).weights
    assert allocate(TWO, PolicyConfig("ThompsonSampling", seed=1)).weights == first
    assert allocate(TWO, PolicyConfig("ThompsonSampling", seed=2)).weights != first


@pytest.mark.parametrize("strategy", ["WeightedSampling", "EpsilonGreedy", "UCB1", "ThompsonSampling"])
def test_min_weight_keeps_every_arm_alive(strategy):
    data = arms(("A", 1, 10_000, 100, 100), ("B", 1, 10_000, 900, 900), ("C", 0, 10_000, 50, 50))
    result = allocate(data, PolicyConfig(strategy, epsilon=0.0, min_weight=0.05))
    assert min(result.weights.values()) >= 0.05 - 1e-12
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert apply_floor({"A": 1.0, "B": 0.0}, 0.1) == pytest.approx({"A": 0.9, "B": 0.1})
    # A floor, not a mixture: weights above it keep their values (the warm-up serves the initial ones).
    assert apply_floor({"A": 0.4, "B": 0.3, "C": 0.3}, 0.05) == pytest.approx({"A": 0.4, "B": 0.3, "C": 0.3})
    floored = apply_floor({"A": 0.9, "B": 0.08, "C": 0.02}, 0.05)  # C at the floor, A and B share the rest
    assert floored == pytest.approx({"A": 0.95 * 0.9 / 0.98, "B": 0.95 * 0.08 / 0.98, "C": 0.05})
    warmup = arms(("A", 0.4, 5, 0, 0), ("B", 0.3, 5, 0, 0), ("C", 0.3, 5, 0, 0))
    served = allocate(warmup, PolicyConfig(strategy, warmup=100, min_weight=0.05))
    if strategy != "WeightedSampling" or served.phase == "warmup":
        assert served.weights == pytest.approx({"A": 0.4, "B": 0.3, "C": 0.3})


@pytest.mark.parametrize("data, config, message", [
    ([], PolicyConfig("UCB1"), "no variants"),
    (arms(("A", 1, 10, 11, 11), ("B", 1, 10, 1, 1)), PolicyConfig("ThompsonSampling"), "outside"),
    (arms(("A", 1, 10, math.nan, 1), ("B", 1, 10, 1, 1)), PolicyConfig("UCB1"), "non-finite"),
    (arms(("A", 1, 10, 1, 1), ("B", 1, 10, 1, 1)), PolicyConfig("UCB1", min_weight=0.6), "exceeds 1"),
    (arms(("A", 0, 10, 1, 1), ("B", 0, 10, 1, 1)), PolicyConfig("UCB1"), "all zero"),
    (arms(("A", 1, 10, 1, 1), ("B", 1, 10, 1, 1)), PolicyConfig("Greedy"), "unknown strategy"),
])
def test_impossible_inputs_are_clear_errors(data, config, message):
    with pytest.raises(PolicyInputError, match=message):
        allocate(data, config)


def test_defined_results_for_degenerate_inputs():
    assert allocate(arms(("Only", 1, 0, 0, 0)), PolicyConfig("ThompsonSampling")).weights == {"Only": 1.0}
    assert allocate(arms(("A", 1, 0, 0, 0), ("B", 1, 0, 0, 0)), PolicyConfig("UCB1")).weights == {"A": 0.5, "B": 0.5}
    # Continuous rewards above the count are fine under the Gaussian model.
    revenue = allocate(arms(("A", 1, 10, 55, 400), ("B", 1, 10, 20, 50)), PolicyConfig("ThompsonSampling",
                                                                                         reward_model="gaussian"))
    assert revenue.weights["A"] > 0.9


@pytest.mark.parametrize("strategy", ["EpsilonGreedy", "UCB1", "ThompsonSampling"])
def test_bandits_beat_a_uniform_split_by_simulation(strategy):
    rates = [0.03, 0.05, 0.08]
    uniform = simulate_regret(PolicyConfig("WeightedSampling"), rates, 60_000, seed=0)
    regrets = [simulate_regret(PolicyConfig(strategy, epsilon=0.1, warmup=100, seed=s), rates, 60_000, seed=s)
               for s in range(3)]
    assert np.mean(regrets) < 0.5 * uniform, (strategy, regrets, uniform)
