"""Compatibility: the inference path moved to the `reslab.inference` package.

`from reslab.infer import Predictor` (and every other public name it had) keeps working; new code
imports from reslab.inference. This module only re-exports, so it adds no import cycle.
"""

from reslab.inference import *  # noqa: F403 (exactly reslab.inference.__all__)
from reslab.inference import __all__  # noqa: F401
