"""Chinchilla's approaches 1 and 2: the frontier and the isoFLOP minimum on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llama_train.scaling.approaches import (
    approach1,
    approach2,
    compute_levels,
    frontier,
    isoflop_profiles,
)


def isoflop_grid(levels, spread=1.0, count=9, centre=None):
    """At each compute C, `count` model sizes log-spaced over +-spread decades around
    `centre(C)`, with D = C / (6 N)."""
    n, d = [], []
    for compute in levels:
        middle = centre(compute) if centre else math.sqrt(compute / 6.0)
        sizes = middle * np.logspace(-spread, spread, count)
        n.extend(sizes)
        d.extend(compute / (6.0 * sizes))
    return np.asarray(n), np.asarray(d)


def test_the_isoflop_vertex_of_an_exact_parabola_is_its_minimum():
    levels = [1e12, 1e13, 1e14, 1e15]
    optimum = lambda c: 0.1 * c**0.45  # noqa: E731
    n, d = isoflop_grid(levels, spread=0.7, centre=lambda c: 1.7 * optimum(c))
    compute = 6.0 * n * d
    loss = 2.0 + 0.3 * (np.log(n) - np.log(optimum(compute))) ** 2
    profiles = isoflop_profiles(n, d, loss)
    assert len(profiles) == 4
    for profile, level in zip(profiles, levels, strict=True):
        assert profile.compute == pytest.approx(level, rel=1e-9)
        assert profile.n_opt == pytest.approx(optimum(level), rel=1e-9)
    allocation = approach2(n, d, loss)
    assert allocation.a == pytest.approx(0.45, abs=1e-9)
    assert allocation.coefficient == pytest.approx(0.1, rel=1e-6)


def test_approach_two_finds_the_compute_optimal_size_of_a_known_law():
    """L = E + A/N^alpha + B/D^beta along isoFLOP lines: N_opt = G (C/6)^a with
    a = beta/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    big_a, alpha, big_b, beta = 400.0, 0.34, 410.0, 0.28
    a = beta / (alpha + beta)
    g = (alpha * big_a / (beta * big_b)) ** (1.0 / (alpha + beta))
    optimum = lambda c: g * (c / 6.0) ** a  # noqa: E731
    levels = [1e15, 1e16, 1e17, 1e18]
    n, d = isoflop_grid(levels, spread=0.5, count=11, centre=optimum)
    loss = 1.69 + big_a / n**alpha + big_b / d**beta
    allocation = approach2(n, d, loss)
    assert allocation.a == pytest.approx(a, abs=0.01)
    for level, found in zip(allocation.compute, allocation.n_opt, strict=True):
        assert found == pytest.approx(optimum(level), rel=0.05)


def test_a_level_whose_minimum_is_outside_its_sizes_is_skipped_and_said():
    levels = [1e12, 1e13, 1e14]
    n, d = isoflop_grid(levels, spread=0.5, count=5)
    compute = 6.0 * n * d
    loss = 2.0 + 0.3 * (np.log(n) - np.log(np.sqrt(compute / 6.0))) ** 2
    loss[compute > 5e13] = 3.0 - 0.01 * np.log(n[compute > 5e13])  # falls all the way
    allocation = approach2(n, d, loss)
    assert len(allocation.n_opt) == 2
    assert any("no minimum inside" in note for note in allocation.notes)


def test_compute_levels_bin_within_a_factor_1_2():
    compute = np.array([1.0, 1.1, 1.19, 2.0, 2.3, 2.5, 10.0])
    levels = compute_levels(compute[::-1])
    values = [sorted(compute[::-1][level]) for level in levels]
    assert values == [[1.0, 1.1, 1.19], [2.0, 2.3], [2.5], [10.0]]


def test_the_frontier_is_the_lowest_loss_at_or_below_each_compute():
    n = np.array([1.0, 2.0, 1.0, 4.0, 2.0, 8.0])
    d = np.array([1.0, 1.0, 4.0, 1.0, 4.0, 1.0])  # compute/6: 1, 2, 4, 4, 8, 8
    loss = np.array([3.0, 2.5, 2.6, 2.4, 2.45, 2.2])
    assert frontier(n, d, loss).tolist() == [0, 1, 3, 5]
    allocation = approach1(n, d, loss)
    # N of the frontier runs: 1, 2, 4, 8 at C/6 = 1, 2, 4, 8: N_opt = C / 6.
    assert allocation.a == pytest.approx(1.0)
    assert allocation.coefficient == pytest.approx(1.0 / 6.0)


def test_too_few_points_give_no_exponent_and_say_why():
    allocation = approach2(np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([1.0, 1.1]))
    assert allocation.a is None
    assert any("isoFLOP grid" in note for note in allocation.notes)
