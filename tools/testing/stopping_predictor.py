"""A Predictor whose engine stops at its first decode step after setup: what Cog's server shows when
the scheduler's loop cannot go on (tests/server/test_engine_health.py)."""
from __future__ import annotations

from typing import Optional

from predict import Predictor


class EngineLost(BaseException):
    """Not an Exception, so no guard of a turn takes it: the loop itself ends (like SystemExit)."""


class StoppingPredictor(Predictor):
    """The real predictor; after setup its decode step raises :class:`EngineLost`."""

    def setup(self, weights: Optional[str] = None) -> None:
        """Set up as the real predictor does, then break the decode step."""
        super().setup(weights)

        def lost(*args: object, **kwargs: object) -> None:
            raise EngineLost("the device was lost")

        self.service.engine.engine.step = lost
