"""Training: the loop that calls the one train step."""

from fitune.trainer.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
