"""lrpilot's daemon: watches training runs and steers their learning rate, live."""

__version__ = "0.1.0"
