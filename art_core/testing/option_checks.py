"""The common options' bounds: every backend refuses the same bad values with the same error as ``TrainOptions``."""

from __future__ import annotations

import math

from art_core.testing.kit import Kit, violation
from art_core.testing.suite import SuiteBase
from art_core.train_options import TrainOptions

# Per common option, the boundary values art_core refuses (docs in TrainOptions): 0 where it must be > 0,
# negatives, ±inf and NaN. A backend that builds TrainOptions on the first line of train() passes.
BOUNDARY_VALUES: dict[str, tuple[float, ...]] = {
    "learning_rate": (0.0, -1e-6, math.inf, -math.inf, math.nan),
    "epsilon": (-0.1, math.inf, math.nan),
    "epsilon_high": (-0.1, math.inf, math.nan),
    "advantage_balance": (-1.5, 1.5, math.inf, math.nan),
}
OPTIONS_RULE = (
    "train() checks the common options first, as art_core.TrainOptions does: the same ValueError for the same "
    "bad value on every backend, before anything is trained or sent"
)


def expected_error(name: str, value: float) -> str:
    """The message ``TrainOptions`` raises for ``name=value``."""
    try:
        TrainOptions(**{name: value})  # type: ignore[arg-type]
    except ValueError as error:
        return str(error)
    raise AssertionError(f"TrainOptions accepts {name}={value!r}; BOUNDARY_VALUES is out of date")


class OptionChecks(SuiteBase):
    def test_bad_common_option_values_are_refused_alike(self, kit: Kit) -> None:
        model = kit.registered_model()
        step = kit.run(kit.backend._get_step(model))
        for name, values in BOUNDARY_VALUES.items():
            for value in values:
                expected = expected_error(name, value)
                try:
                    kit.run(kit.backend.train(model, [], **{name: value}), self.failure_timeout_s)
                except ValueError as error:
                    if str(error) != expected:
                        violation(f"{name}={value!r} raised {str(error)!r}, not {expected!r}", OPTIONS_RULE)
                    continue
                except Exception as error:
                    violation(f"{name}={value!r} raised {type(error).__name__}: {error}", OPTIONS_RULE)
                violation(f"train() accepted {name}={value!r}", OPTIONS_RULE)
        if kit.run(kit.backend._get_step(model)) != step:
            violation("a refused train() call changed the step", OPTIONS_RULE)
