"""group=None: distclip must be bitwise identical to the installed torch.nn.utils.

Each case builds the same parameters twice from a seed, runs torch on one copy and distclip on the other
(``_tester.compare``), and compares the returned value (bits, dtype, device), the gradients after the call
(bits, and the same tensor objects), the warnings (category, message, line) and the exceptions (type and
message).

This file: hundreds of seeded random cases over every argument of ``clip_grad_norm_``, ``get_total_norm``
and ``clip_grad_value_``.
"""

import math
import random

from _tester import DTYPES, TORCH_NORM_TYPES, Spec, compare


def test_random_sweep():
    """Hundreds of seeded random cases over every argument, each compared bitwise with torch."""
    rng = random.Random(1234)
    for case in range(400):
        count = rng.randint(0, 6)
        spec = Spec(
            [(tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3))), rng.choice(DTYPES),
              rng.random() > 0.2, 10 ** rng.uniform(-4, 4)) for _ in range(count)],
            inject={i: rng.choice([math.nan, math.inf, -math.inf]) for i in range(count) if rng.random() < 0.05},
            seed=case,
        )
        form = rng.choice(["list", "tuple", "generator"] + (["tensor"] if count == 1 else []))
        foreach = rng.choice([None, True, False])
        norm_type = rng.choice(TORCH_NORM_TYPES)
        error_if_nonfinite = rng.random() < 0.3
        which = rng.random()
        if which < 0.6:
            compare(spec, "clip_grad_norm_", form, max_norm=10 ** rng.uniform(-2, 3), norm_type=norm_type,
                    error_if_nonfinite=error_if_nonfinite, foreach=foreach)
        elif which < 0.8:
            compare(spec, "get_total_norm", form, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
                    foreach=foreach)
        else:
            compare(spec, "clip_grad_value_", form, clip_value=10 ** rng.uniform(-2, 2), foreach=foreach)
