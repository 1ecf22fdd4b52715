"""Influence-dynamics patterns ([concepts.md: Time windows]) on constructed window-score matrices whose labels are known
by construction, plus independent (loop-based) references for the flip rate and the trend statistic."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_influence.results.patterns import (
    PATTERNS,
    InfluencePatterns,
    abs_z_trend,
    classify_patterns,
    sign_flip_rate,
    window_zscores,
)

DTYPE = torch.float64


def exact_mixture(num_windows: int = 8) -> torch.Tensor:
    """``Tensor[W, 8]`` whose every window has mean 0 and the same spread, so z ∝ scores exactly.

    Columns: 0, 1 fade (early); 2, 3 grow (late); 4, 5 alternate sign (fluctuating); 6, 7 constant.
    Pairs (a, −a) keep the mean at 0; a² + b² = R² keeps the spread constant.
    """
    theta = torch.linspace(0.1, 1.4, num_windows, dtype=DTYPE)
    a, b = 3 * torch.cos(theta), 3 * torch.sin(theta)
    alt = torch.tensor([(-1.0) ** t for t in range(num_windows)], dtype=DTYPE)
    two = torch.full((num_windows,), 2.0, dtype=DTYPE)
    return torch.stack([a, -a, b, -b, alt, -alt, two, -two], dim=1)


MIXTURE_LABELS = ["early", "early", "late", "late", "fluctuating", "fluctuating", "stable", "stable"]


def reference_flip_rate(z: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Loop over samples and windows: carry the last non-zero sign, count opposite signs."""
    num_windows, k = z.shape
    out = torch.zeros(k, dtype=DTYPE)
    for j in range(k):
        last, flips = 0, 0
        for t in range(num_windows):
            v = float(z[t, j])
            s = 0 if abs(v) <= tol else (1 if v > 0 else -1)
            if s != 0:
                if last != 0 and s != last:
                    flips += 1
                last = s
        out[j] = flips / (num_windows - 1) if num_windows > 1 else 0.0
    return out


def reference_trend(y: torch.Tensor) -> tuple[float, float]:
    """Slope and t-statistic of y[W] against 0..W-1 through lstsq on the design [1, t]."""
    n = y.numel()
    x = torch.arange(n, dtype=DTYPE)
    design = torch.stack([torch.ones(n, dtype=DTYPE), x], dim=1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    resid = y - design @ coef
    sigma2 = float(resid @ resid) / (n - 2)
    cov = sigma2 * torch.linalg.inv(design.T @ design)
    return float(coef[1]), float(coef[1]) / math.sqrt(float(cov[1, 1]))


# ----------------------------------------------------------------------------- labels by construction


def test_mixture_in_one_matrix():
    p = classify_patterns(exact_mixture())
    assert p.labels == MIXTURE_LABELS
    assert p.counts() == {"stable": 2, "early": 2, "late": 2, "fluctuating": 2}
    assert p.num_windows == 8 and len(p) == 8
    assert torch.all(p.slope[:2] < 0) and torch.all(p.trend[:2] <= -2.0)
    assert torch.all(p.slope[2:4] > 0) and torch.all(p.trend[2:4] >= 2.0)
    assert torch.equal(p.flip_rate[4:6], torch.ones(2, dtype=DTYPE))
    assert torch.equal(p.flip_rate[[0, 1, 2, 3, 6, 7]], torch.zeros(6, dtype=DTYPE))


def test_decaying_sample_among_constant_others_is_early():
    gen = torch.Generator().manual_seed(0)
    others = torch.randn(40, generator=gen, dtype=DTYPE)
    amplitude = torch.linspace(12.0, 0.0, 10, dtype=DTYPE)  # large early, gone at the end
    scores = torch.cat([amplitude.unsqueeze(1), others.expand(10, 40)], dim=1)
    p = classify_patterns(scores)
    assert p.labels[0] == "early"
    assert p.slope[0] < 0
    # z-scores are relative: as sample 0 fades the spread shrinks and most others' |z| grows, so
    # they may read "late"; none of them alternates sign, though.
    assert "fluctuating" not in p.labels[1:]
    assert p.counts()["late"] > p.counts()["early"]


def test_rising_sample_among_constant_others_is_late():
    gen = torch.Generator().manual_seed(1)
    others = torch.randn(40, generator=gen, dtype=DTYPE)
    amplitude = -torch.linspace(0.0, 12.0, 10, dtype=DTYPE)  # harmful, more and more
    scores = torch.cat([others.expand(10, 40), amplitude.unsqueeze(1)], dim=1)
    p = classify_patterns(scores, torch.arange(100, 141))
    assert p.labels[-1] == "late"
    assert p.ids("late").tolist()[-1] == 140
    assert p.slope[-1] > 0
    assert "fluctuating" not in p.labels[:-1]  # the others only shrink relatively (mostly "early")
    assert p.counts()["early"] > p.counts()["late"]


def test_alternating_sign_is_fluctuating_and_constant_is_stable():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(7, 30, generator=gen, dtype=DTYPE) * 0.1 + 1.0  # all positive, near 1
    alt = 5 * torch.tensor([(-1.0) ** t for t in range(7)], dtype=DTYPE)
    scores = torch.cat([alt.unsqueeze(1), base], dim=1)
    p = classify_patterns(scores)
    assert p.labels[0] == "fluctuating"
    assert float(p.flip_rate[0]) == 1.0

    constant = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=DTYPE).expand(9, 4)
    q = classify_patterns(constant)
    assert q.labels == ["stable"] * 4
    assert torch.equal(q.flip_rate, torch.zeros(4, dtype=DTYPE))


def test_fluctuation_takes_precedence_over_trend():
    # Sign alternates every window while |score| decays: fluctuating, not early.
    num_windows = 8
    alt = torch.tensor([(-1.0) ** t for t in range(num_windows)], dtype=DTYPE)
    decay = torch.linspace(6.0, 0.5, num_windows, dtype=DTYPE)
    scores = torch.stack([alt * decay, -alt * decay, torch.full_like(decay, 1.0), torch.full_like(decay, -1.0)], 1)
    p = classify_patterns(scores)
    assert p.labels[:2] == ["fluctuating", "fluctuating"]
    assert p.slope[0] < 0 and p.trend[0] <= -2.0  # it would be early on the trend alone


# ----------------------------------------------------------------------------- z-scores per window


def test_labels_invariant_to_positive_scaling_and_shift_of_a_window():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(12, 25, generator=gen, dtype=DTYPE).cumsum(0)
    scores[:, 0] += torch.linspace(8, 0, 12, dtype=DTYPE)
    scores[:, 1] += torch.linspace(0, 8, 12, dtype=DTYPE)
    base = classify_patterns(scores)
    factors = torch.rand(12, 1, generator=gen, dtype=DTYPE) * 100 + 0.01
    shifts = torch.randn(12, 1, generator=gen, dtype=DTYPE) * 10
    for changed in (scores * factors, scores + shifts, scores * factors + shifts):
        other = classify_patterns(changed)
        assert other.labels == base.labels
        torch.testing.assert_close(other.flip_rate, base.flip_rate)
        torch.testing.assert_close(other.trend, base.trend)
    # The labels are not trivially constant, so the invariance says something.
    assert len(set(base.labels)) >= 2


def test_z_scores_are_not_global():
    # The same sample scaled down per window by the *global* magnitude would look early; per-window
    # z-scores see that every sample shrinks together, so nothing is early.
    gen = torch.Generator().manual_seed(4)
    pattern = torch.randn(1, 20, generator=gen, dtype=DTYPE)
    scores = pattern * torch.linspace(10.0, 0.1, 9, dtype=DTYPE).unsqueeze(1)
    assert classify_patterns(scores).labels == ["stable"] * 20
    # Control: the raw magnitudes do fall, so a rule without per-window standardisation would fire.
    slope, t = abs_z_trend(scores)
    assert torch.all(slope[pattern[0].abs() > 0.1] < 0)


def test_window_zscores_matches_definition():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 6, generator=gen, dtype=DTYPE)
    scores[2] = 7.0  # an all-equal window
    z = window_zscores(scores)
    for t in (0, 1, 3):
        row = scores[t]
        expected = (row - row.mean()) / math.sqrt(float(((row - row.mean()) ** 2).mean()))
        torch.testing.assert_close(z[t], expected)
    assert torch.equal(z[2], torch.zeros(6, dtype=DTYPE))


def test_all_equal_window_with_round_off_gives_zero():
    # 0.7 repeated in one window: on torch 2.x CPU the computed float64 std is ~1e-16, not 0, yet
    # the window is constant and must give z = 0, not ±1 from dividing round-off by round-off.
    scores = torch.full((1, 3), 0.7, dtype=DTYPE)
    assert torch.equal(window_zscores(scores), torch.zeros(1, 3, dtype=DTYPE))
    scores = torch.full((4, 3), 0.7, dtype=DTYPE)
    assert classify_patterns(scores).labels == ["stable"] * 3
    assert classify_patterns(scores.float()).labels == ["stable"] * 3
    # Values one ulp apart are round-off, not a spread.
    one_ulp = torch.nextafter(torch.tensor(1.0, dtype=DTYPE), torch.tensor(2.0, dtype=DTYPE))
    row = torch.stack([torch.tensor(1.0, dtype=DTYPE), one_ulp, torch.tensor(1.0, dtype=DTYPE)])
    assert torch.equal(window_zscores(row.unsqueeze(0)), torch.zeros(1, 3, dtype=DTYPE))


# ----------------------------------------------------------------------------- flips and zeros


def test_flip_rate_against_loop_reference():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(11, 30, generator=gen, dtype=DTYPE)
    z[torch.rand(11, 30, generator=gen) < 0.3] = 0.0
    torch.testing.assert_close(sign_flip_rate(z), reference_flip_rate(z))
    torch.testing.assert_close(sign_flip_rate(z, 0.5), reference_flip_rate(z, 0.5))


def test_zeros_are_skipped_not_counted():
    z = torch.tensor(
        [
            [1.0, 1.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, -1.0],
            [-1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 2.0, 0.0],
            [1.0, 0.0, -2.0, 1.0],
        ],
        dtype=DTYPE,
    )
    # col 0: + 0 − 0 + → 2 flips; col 1: + 0 + 0 0 → none; col 2: 0 0 0 + − → 1; col 3: + − 0 0 + → 2.
    expected = torch.tensor([2, 0, 1, 2], dtype=DTYPE) / 4
    torch.testing.assert_close(sign_flip_rate(z), expected)


def test_default_sign_tolerance_ignores_windows_within_half_a_std():
    # sample 0 alternates at |z| ≈ 0.2 around the mean: near-average, not fluctuating by default
    scores = torch.tensor([[0.2, 1.0, -1.0, 3.0, -3.0], [-0.2, 1.0, -1.0, 3.0, -3.0], [0.2, 1.0, -1.0, 3.0, -3.0]])
    assert classify_patterns(scores).labels[0] != "fluctuating"
    assert classify_patterns(scores, sign_tolerance=0.0).labels[0] == "fluctuating"


def test_sign_tolerance_ignores_near_mean_windows():
    # Column 0 wobbles around its window's mean (|z| small) while staying positive in score.
    wobble = torch.tensor([0.05, -0.05, 0.05, -0.05, 0.05], dtype=DTYPE)
    z = torch.stack([wobble, torch.ones(5, dtype=DTYPE)], dim=1)
    assert float(sign_flip_rate(z)[0]) == 1.0
    assert float(sign_flip_rate(z, sign_tolerance=0.1)[0]) == 0.0


# ----------------------------------------------------------------------------- trend statistic


def test_trend_against_lstsq_reference():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(9, 12, generator=gen, dtype=DTYPE) + torch.linspace(-2, 2, 9, dtype=DTYPE).unsqueeze(1)
    slope, t = abs_z_trend(z)
    for j in range(12):
        ref_slope, ref_t = reference_trend(z[:, j].abs())
        assert float(slope[j]) == pytest.approx(ref_slope, rel=1e-9, abs=1e-12)
        assert float(t[j]) == pytest.approx(ref_t, rel=1e-7)


def test_exact_line_gives_infinite_t_and_flat_line_gives_zero():
    z = torch.stack(
        [
            torch.linspace(3.0, 0.5, 6, dtype=DTYPE),  # exact falling line
            torch.linspace(0.5, 3.0, 6, dtype=DTYPE),  # exact rising line
            torch.full((6,), 1.5, dtype=DTYPE),  # flat
        ],
        dim=1,
    )
    slope, t = abs_z_trend(z)
    assert t[0] < -1e6 and t[1] > 1e6  # ±inf exactly, or round-off-sized residuals
    assert float(slope[2]) == 0.0 and float(t[2]) == 0.0

    # Exactly zero residual (integer-valued line): ±inf, not NaN.
    z_int = torch.tensor([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]], dtype=DTYPE)
    slope, t = abs_z_trend(z_int)
    assert t.tolist() == [-math.inf, math.inf]


def test_min_slope_rejects_negligible_exact_trend():
    # |z| drifts by 1e-4 per window on an exact line: t is huge, the change is negligible.
    drift = 1.0 + 1e-4 * torch.arange(10, dtype=DTYPE)
    scores = torch.stack([drift, -drift], dim=1)  # z = ±1 exactly in every window → slope 0
    assert classify_patterns(scores).labels == ["stable", "stable"]

    mixture = exact_mixture()
    tiny = mixture.clone()
    tiny[:, 6] = 2.0 + 1e-3 * torch.arange(8, dtype=DTYPE)  # nearly constant, slightly rising
    tiny[:, 7] = -tiny[:, 6]
    p = classify_patterns(tiny)
    assert p.labels[6:] == ["stable", "stable"]
    assert p.trend[6] >= 2.0  # significant by t alone: only min_slope keeps it stable
    assert classify_patterns(tiny, min_slope=0.0).labels[6:] == ["late", "late"]


# ----------------------------------------------------------------------------- thresholds


def test_fluctuation_threshold_moves_the_verdict():
    # 3 flips in 7 transitions (rate 3/7 ≈ 0.43) for column 0.
    signs = torch.tensor([1, -1, 1, -1, -1, -1, -1, -1], dtype=DTYPE)
    scores = torch.stack([signs * 2.0, -signs * 2.0, torch.ones(8, dtype=DTYPE), -torch.ones(8, dtype=DTYPE)], 1)
    p = classify_patterns(scores)
    assert float(p.flip_rate[0]) == pytest.approx(3 / 7)
    assert p.labels[0] == "stable"
    assert classify_patterns(scores, fluctuation_threshold=0.4).labels[0] == "fluctuating"
    assert classify_patterns(scores, fluctuation_threshold=3 / 7).labels[0] == "fluctuating"  # "at least"
    assert classify_patterns(scores, fluctuation_threshold=0.45).labels[0] == "stable"


def test_trend_threshold_moves_the_verdict():
    gen = torch.Generator().manual_seed(8)
    mixture = exact_mixture(10)
    noisy = mixture.clone()
    # Column 0: a noisy decline; its t is finite and moderate.
    noisy[:, 0] = torch.linspace(3.0, 2.0, 10, dtype=DTYPE) + 0.3 * torch.randn(10, generator=gen, dtype=DTYPE)
    p = classify_patterns(noisy)
    t0 = float(p.trend[0])
    assert math.isfinite(t0) and t0 < 0
    lower, higher = abs(t0) * 0.9, abs(t0) * 1.1
    assert classify_patterns(noisy, trend_threshold=lower).labels[0] == "early"
    assert classify_patterns(noisy, trend_threshold=higher).labels[0] == "stable"
    assert classify_patterns(noisy, trend_threshold=lower, min_slope=abs(float(p.slope[0])) * 1.1).labels[0] == "stable"
    # Disabling trends leaves only stable and fluctuating.
    assert set(classify_patterns(mixture, trend_threshold=math.inf).labels) == {"stable", "fluctuating"}


# ----------------------------------------------------------------------------- edge cases


def test_one_window_is_all_stable():
    scores = torch.tensor([[5.0, -1.0, 0.0, 2.0]])
    p = classify_patterns(scores)
    assert p.labels == ["stable"] * 4
    assert torch.equal(p.flip_rate, torch.zeros(4, dtype=DTYPE))
    assert torch.equal(p.trend, torch.zeros(4, dtype=DTYPE))
    assert torch.equal(p.slope, torch.zeros(4, dtype=DTYPE))


def test_two_windows_flip_but_never_trend():
    scores = torch.tensor([[3.0, -3.0, 10.0, -10.0, 1.0, -1.0], [-3.0, 3.0, 1.0, -1.0, 10.0, -10.0]])
    p = classify_patterns(scores, sign_tolerance=0.0)  # samples 0, 1 sit at |z| ≈ 0.49
    assert p.labels[:2] == ["fluctuating", "fluctuating"]
    assert p.labels[2:] == ["stable"] * 4  # they fall/rise a lot, but W = 2 cannot test a trend
    assert torch.equal(p.trend, torch.zeros(6, dtype=DTYPE))
    assert p.slope[2] < 0 and p.slope[4] > 0


def test_three_windows_can_trend():
    scores = exact_mixture(3)
    assert classify_patterns(scores).labels == MIXTURE_LABELS


def test_all_zero_windows_and_zero_window_in_the_middle():
    p = classify_patterns(torch.zeros(6, 5))
    assert p.labels == ["stable"] * 5
    assert torch.equal(p.flip_rate, torch.zeros(5, dtype=DTYPE))

    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 2.0, 1.0, -1.0]])
    p = classify_patterns(scores)
    # Columns 0, 1 go +, 0, − → one flip in two transitions: fluctuating at the default 0.5.
    torch.testing.assert_close(p.flip_rate, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=DTYPE))
    assert p.labels[:2] == ["fluctuating", "fluctuating"]


def test_single_sample_is_stable():
    scores = torch.tensor([[5.0], [-4.0], [0.1], [-3.0], [9.0]])
    p = classify_patterns(scores, torch.tensor([42]))
    assert p.labels == ["stable"]
    assert p.as_dict() == {42: "stable"}


def test_no_samples():
    p = classify_patterns(torch.zeros(4, 0))
    assert p.labels == [] and p.sample_ids.numel() == 0
    assert p.counts() == dict.fromkeys(PATTERNS, 0)


def test_dtypes_and_devices_are_accepted():
    mixture = exact_mixture()
    assert classify_patterns(mixture.float()).labels == MIXTURE_LABELS
    assert classify_patterns(torch.zeros(3, 4, dtype=torch.long)).labels == ["stable"] * 4
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17], dtype=torch.int32)
    p = classify_patterns(mixture, ids)
    assert p.sample_ids.dtype == torch.long and p.flip_rate.dtype == DTYPE


def test_permuting_samples_permutes_labels():
    gen = torch.Generator().manual_seed(9)
    scores = exact_mixture(9)
    perm = torch.randperm(8, generator=gen)
    ids = torch.arange(200, 208)
    p = classify_patterns(scores[:, perm], ids[perm])
    assert p.as_dict() == dict(zip(ids.tolist(), MIXTURE_LABELS))


# ----------------------------------------------------------------------------- the result object


def test_result_accessors():
    ids = torch.tensor([7, 3, 9, 1, 4, 8, 2, 6])
    p = classify_patterns(exact_mixture(), ids)
    assert isinstance(p, InfluencePatterns)
    assert p.ids("early").tolist() == [7, 3]
    assert p.ids("late").tolist() == [9, 1]
    assert p.ids("fluctuating").tolist() == [4, 8]
    assert p.ids("stable").tolist() == [2, 6]
    assert p.ids("early").dtype == torch.long
    assert list(p.counts()) == list(PATTERNS)
    assert sum(p.counts().values()) == 8
    assert p.as_dict() == {
        7: "early",
        3: "early",
        9: "late",
        1: "late",
        4: "fluctuating",
        8: "fluctuating",
        2: "stable",
        6: "stable",
    }
    with pytest.raises(ValueError, match="Unknown pattern"):
        p.ids("Early")


def test_empty_pattern_ids():
    p = classify_patterns(torch.zeros(5, 3))
    assert p.ids("late").numel() == 0 and p.ids("late").dtype == torch.long
    assert p.counts() == {"stable": 3, "early": 0, "late": 0, "fluctuating": 0}


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "scores, error, match",
    [
        (torch.zeros(5), ValueError, "2-D"),
        (torch.zeros(2, 3, 4), ValueError, "2-D"),
        (torch.zeros(0, 4), ValueError, "no windows"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
        (torch.zeros(3, 2, dtype=torch.bool), TypeError, "real-valued"),
        (torch.zeros(3, 2, dtype=torch.complex64), TypeError, "real-valued"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "non-finite"),
        (torch.tensor([[1.0, 2.0], [float("inf"), 1.0]]), ValueError, "window 1"),
    ],
)
def test_bad_window_scores(scores, error, match):
    with pytest.raises(error, match=match):
        classify_patterns(scores)


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.arange(3), ValueError, "k = 4"),
        (torch.arange(4).reshape(2, 2), ValueError, "1-D"),
        (torch.arange(4.0), TypeError, "integers"),
        (torch.tensor([1, 2, 2, 3]), ValueError, "duplicates"),
        ([0, 1, 2, 3], TypeError, "LongTensor"),
    ],
)
def test_bad_sample_ids(ids, error, match):
    with pytest.raises(error, match=match):
        classify_patterns(torch.zeros(3, 4), ids)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"fluctuation_threshold": 0.0}, ValueError),
        ({"fluctuation_threshold": 1.5}, ValueError),
        ({"fluctuation_threshold": float("nan")}, ValueError),
        ({"fluctuation_threshold": True}, TypeError),
        ({"trend_threshold": 0.0}, ValueError),
        ({"trend_threshold": -2.0}, ValueError),
        ({"trend_threshold": float("nan")}, ValueError),
        ({"trend_threshold": "2"}, TypeError),
        ({"min_slope": -0.1}, ValueError),
        ({"min_slope": math.inf}, ValueError),
        ({"sign_tolerance": -1.0}, ValueError),
        ({"sign_tolerance": float("nan")}, ValueError),
    ],
)
def test_bad_thresholds(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        classify_patterns(torch.zeros(3, 4), **kwargs)


def test_boundary_thresholds_are_accepted():
    scores = exact_mixture()
    assert classify_patterns(scores, fluctuation_threshold=1.0).labels == MIXTURE_LABELS
    assert classify_patterns(scores, min_slope=0.0, sign_tolerance=0.0).labels == MIXTURE_LABELS
