"""Training: the run's sequence (``run.py``), its events and listeners, the phases it calls."""

from fitune.trainer.events import Listener
from fitune.trainer.run import TrainResult, train

__all__ = ["Listener", "TrainResult", "train"]
