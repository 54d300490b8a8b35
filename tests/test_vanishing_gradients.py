"""vanishing_gradients.claims: the notes' BPTT claims, judged from hand-made results."""

import math

from experiments import vanishing_gradients as vg


def _results(rnn_slopes, lstm_slopes, no_clip, clip, sigma_ok=True):
    def cell(slopes):
        return {"init": {"slope": -0.5}, "init_slope_seeds": [-0.57, -0.56, -0.65],
                "trained_slope_seeds": slopes}  # fmt: skip

    return {
        "cells": {"rnn": cell(rnn_slopes), "lstm": cell(lstm_slopes)},
        "sigmas": {
            "0.5": {
                "sigma": 0.5,
                "slope": -1.34,
                "log_sigma": math.log(0.5),
                "slope_within_bound": sigma_ok,
            },
            "1.5": {
                "sigma": 1.5,
                "slope": -0.2,
                "log_sigma": math.log(1.5),
                "slope_within_bound": None,
            },
        },  # fmt: skip
        "spikes": {"no_clip": {"spiked_seeds": no_clip}, "clip": {"spiked_seeds": clip}},
    }


def test_claims_verdicts():
    cfg = vg.Config()
    good = vg.claims(_results([-0.5, -0.55, -0.45], [-0.01, -0.02, -0.03], [True] * 3,
                              [False] * 3), cfg)  # fmt: skip
    assert [c.holds for c in good] == [True, True, True, True]
    vanish, bound, lstm, clip = good
    # the largest of the three init slopes, -0.56, over 49 steps: exp(-27.4)
    assert f"{math.exp(-0.56 * 49):.1e}" in vanish.evidence and vanish.seeds == 3
    assert "sigma 0.5: slope -1.340 <= -0.693" in bound.evidence and bound.seeds is None
    assert lstm.evidence.startswith("LSTM -0.020 ± 0.006 vs tanh RNN -0.500 ± 0.029 (3 seeds")
    assert clip.evidence == "spiked without clipping 3/3, with clipping 0/3"
    bad = vg.claims(_results([-0.5, -0.1, -0.3], [-0.3, -0.2, -0.4], [True, False, True],
                             [False] * 3, sigma_ok=False), cfg)  # fmt: skip
    assert [c.holds for c in bad] == [True, False, False, False]
