"""Training: a typed config, a flat loop, schedules as pure functions, exact resume.

    from reslab.train import TrainConfig, train
    summary = train(TrainConfig(model="resnet20", data="digits", epochs=8))
"""

from reslab.train.config import TrainConfig
from reslab.train.loop import train
from reslab.train.steps import make_step

__all__ = ["TrainConfig", "make_step", "train"]
