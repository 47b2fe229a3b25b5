"""benchmarks/twin_probe.py: the ridge probe and the twin comparisons it is scored on."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import twin_probe  # noqa: E402


def test_ridge_probe_recovers_a_linear_rule_on_new_rows():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 3))
    x_fit, x_new = rng.normal(3.0, 2.0, size=(2000, 16)), rng.normal(3.0, 2.0, size=(500, 16))
    y = np.sign((x_fit - 3.0) @ w)
    scores = twin_probe.fit_ridge(x_fit, y)(x_new)
    assert scores.shape == (500, 3)
    agree = np.mean(np.sign(scores) == np.sign((x_new - 3.0) @ w))
    assert agree > 0.95, agree


def test_ridge_probe_scores_noise_at_chance():
    rng = np.random.default_rng(1)
    x_fit, x_new = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    y = np.sign(rng.normal(size=(2000, 1)))
    y_new = np.sign(rng.normal(size=(2000, 1)))
    agree = np.mean(np.sign(twin_probe.fit_ridge(x_fit, y)(x_new)) == y_new)
    assert 0.45 < agree < 0.55, agree


def test_twin_comparisons_put_the_product_with_the_detail_first():
    details_of = {1: {"zip", "cuffs"}, 2: {"zip"}, 3: {"belt"}, 4: {"zip"}, 5: set(), 6: {"logo patch"}}
    twins = [(1, 2, "cuffs"),         # a has the detail
             (5, 6, "logo patch"),    # b has it
             (3, 4, "belt vs zip")]   # a has belt where b has zip: one comparison per detail
    assert twin_probe.twin_comparisons(twins, details_of) == [
        ("cuffs", 1, 2), ("logo patch", 6, 5), ("belt", 3, 4), ("zip", 4, 3)]
