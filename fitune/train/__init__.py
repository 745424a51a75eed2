"""Training: the loop that calls the one train step."""

from fitune.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
