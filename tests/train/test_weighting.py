"""Self-paced and CoBa weights on synthetic validation-loss histories whose answers are worked out by hand."""

import json
import math

import pytest

from mftcore.weighting import CoBa, SelfPaced, fit_slope


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_slope_is_exact_on_a_line_and_a_hole_does_not_shift_x():
    xs = [10, 20, 30, 40, 50]
    ys = [3 * x + 1 for x in xs]
    assert fit_slope(xs, ys) == pytest.approx(3.0, abs=1e-12)
    # A task missing from one measurement: MFTCoder's fit pairs the remaining y values with the first
    # four x values, [10, 20, 30, 40] against the ys of [10, 20, 40, 50], and gets 4.2 instead of 3.
    assert fit_slope(xs, [ys[0], ys[1], None, ys[3], ys[4]]) == pytest.approx(3.0, abs=1e-12)
    assert fit_slope(xs, [ys[0], float("nan"), ys[2], ys[3], ys[4]]) == pytest.approx(3.0, abs=1e-12)
    assert fit_slope([1], [5.0]) == 0.0 and fit_slope([1, 2], [None, 5.0]) == 0.0
    assert fit_slope([1, 2, 3], [0.0, 0.0, 0.0]) == 0.0  # a real zero loss is a point, not a hole


def test_self_paced_is_uniform_until_the_window_fills_then_mftcoders_formula():
    sp = SelfPaced(2, history_length=3, scale_factor=50)
    sp.observe(1, [5.0, 4.0])
    sp.observe(2, [3.0, 3.0])
    assert sp.weights() == [0.5, 0.5]
    sp.observe(3, [1.0, 2.0])  # slopes -2 and -1
    n = [2 * -2 / 3, 2 * -1 / 3]
    p = softmax(n)
    score = [p[0] * -n[0], p[1] * -n[1]]
    assert sp.weights() == pytest.approx(softmax([50 * s for s in score]), abs=1e-12)
    # Only the last history_length measurements count: a fourth point slides the window.
    sp.observe(4, [1.0, 1.0])  # window steps 2..4: task 0 slope -1, task 1 slope -1
    assert sp.weights() == pytest.approx([0.5, 0.5], abs=1e-12)


def coba_run(ratios_a, ratios_b, initial=(1.0, 1.0), **kw):
    coba = CoBa(2, **kw)
    coba.set_initial(list(initial))
    for step, (a, b) in enumerate(zip(ratios_a, ratios_b), start=1):
        coba.observe(step, [a * initial[0], b * initial[1]])
    return coba


def test_coba_steady_convergence_weights_the_slower_task_by_rcs():
    # Ratios fall at constant rates -0.02 and -0.01 per step: every slope and alpha_max is constant, so
    # ACS = softmax(-n*alpha/(n*|alpha|)) = softmax([1, 1]) is uniform, DF = m * (1/m) = 1, w = RCS.
    # Initial losses 2 and 4 do not matter: CoBa works on loss ratios.
    steps = range(1, 9)
    coba = coba_run([1 - 0.02 * s for s in steps], [1 - 0.01 * s for s in steps], initial=(2.0, 4.0),
                    warmup_steps=3, history_length=4, tau=5)
    rcs = softmax([2 * -0.02 / 0.03, 2 * -0.01 / 0.03])
    assert coba.last["df"] == pytest.approx(1.0, abs=1e-9)
    assert coba.last["acs"] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert coba.weights() == pytest.approx(rcs, abs=1e-9)
    assert coba.weights()[1] > coba.weights()[0]  # the slower-converging task weighs more


def test_coba_is_uniform_before_warmup():
    coba = coba_run([1.0, 0.9, 0.8], [1.0, 0.99, 0.98], warmup_steps=4, history_length=10)
    assert coba.weights() == [0.5, 0.5] and coba.last["df"] is None and coba.alpha_max == []


def test_coba_divergence_hands_the_weight_to_acs():
    # history_length 2: each slope is the difference of the last two ratios (steps are 1 apart).
    #   task 0: 1.00, 0.90, 0.80, 0.85 -> slopes at steps 2..4: -0.10, -0.10, +0.05 (diverges at 4)
    #   task 1: 1.00, 0.95, 0.90, 0.85 -> slopes -0.05, -0.05, -0.05
    coba = coba_run([1.0, 0.9, 0.8, 0.85], [1.0, 0.95, 0.9, 0.85], warmup_steps=2, history_length=2, tau=5)
    # RCS: alpha = [0.05, -0.05], K * alpha / sum|alpha| = [1, -1]
    rcs = softmax([1.0, -1.0])
    # ACS over the last n = 2 slopes: task 0: -2 * 0.05 / (0.10 + 0.05); task 1: -2 * -0.05 / (0.05 + 0.05)
    acs = softmax([-2 * 0.05 / 0.15, 1.0])
    # alpha_max over steps 2..4 = [-0.05, -0.05, 0.05], m = 3: logits 5 * -3 * alpha_max / 0.15 = [5, 5, -5]
    df = 3 * math.exp(-5) / (2 * math.exp(5) + math.exp(-5))
    assert coba.last["rcs"] == pytest.approx(rcs, abs=1e-9)
    assert coba.last["acs"] == pytest.approx(acs, abs=1e-9)
    assert coba.last["df"] == pytest.approx(df, rel=1e-6)
    assert coba.weights() == pytest.approx([df * r + (1 - df) * a for r, a in zip(rcs, acs)], abs=1e-9)
    assert coba.weights()[0] < 0.2  # the diverging task is cut back, although RCS alone would favour it
    # One step earlier all tasks converged steadily: DF was 1.
    before = coba_run([1.0, 0.9, 0.8], [1.0, 0.95, 0.9], warmup_steps=2, history_length=2, tau=5)
    assert before.last["df"] == pytest.approx(1.0, abs=1e-12)


def test_coba_state_round_trips_through_json_and_continues_identically():
    a_hist = [1.0, 0.9, 0.85, 0.83, 0.86, 0.9]
    b_hist = [1.0, 0.97, 0.93, 0.9, 0.86, 0.83]
    full = coba_run(a_hist, b_hist, warmup_steps=2, history_length=3)
    half = coba_run(a_hist[:3], b_hist[:3], warmup_steps=2, history_length=3)
    restored = CoBa(2, warmup_steps=2, history_length=3)
    restored.load_state_dict(json.loads(json.dumps(half.state_dict())))
    for step in (4, 5, 6):
        restored.observe(step, [a_hist[step - 1], b_hist[step - 1]])
    assert restored.weights() == full.weights()
    assert restored.state_dict() == full.state_dict()


def test_coba_missing_task_measurement_keeps_its_slope():
    # Task 1 is absent from the step-3 sample: its slope still comes out exactly -0.01.
    coba = CoBa(2, warmup_steps=1, history_length=5)
    coba.set_initial([1.0, 1.0])
    for step, b in zip(range(1, 6), [0.99, 0.98, None, 0.96, 0.95]):
        coba.observe(step, [1 - 0.02 * step, b])
    assert coba.slopes[-1] == pytest.approx([-0.02, -0.01], abs=1e-12)
