"""The paper's experiments: degradation (Figure 6), vanishing gradients, layer responses (Figure 7),
the CIFAR-10 test errors of Table 6 over seeds (table6); and residual adds in inception nets
(Szegedy et al. 2016, section 5).

Each takes a typed config, writes its JSON and figure into `config.out`, and returns the JSON.
"""

from reslab.experiments.degradation import DegradationConfig, run_degradation
from reslab.experiments.gradients import GradientsConfig, run_gradients
from reslab.experiments.inception import InceptionConfig, run_inception
from reslab.experiments.responses import ResponsesConfig, run_responses
from reslab.experiments.table6 import Table6Config, run_table6

__all__ = [
    "DegradationConfig",
    "GradientsConfig",
    "InceptionConfig",
    "ResponsesConfig",
    "Table6Config",
    "run_degradation",
    "run_gradients",
    "run_inception",
    "run_responses",
    "run_table6",
]
