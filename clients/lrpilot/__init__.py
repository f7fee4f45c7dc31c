"""lrpilot: stream training metrics to the lrpilot daemon and apply the learning rates it decides."""

__version__ = "0.1.0"
