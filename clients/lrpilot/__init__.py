"""lrpilot: stream training metrics to the lrpilot daemon and apply the learning rates it decides.

Usage with any training loop::

    import lrpilot

    with lrpilot.Client("ws://127.0.0.1:8765/ws", job="mnist-a", initial_lr=0.1) as client:
        for step, batch in enumerate(loader):
            lr = client.lrs_for_step(step)[0]      # decisions apply exactly at their step
            ...
            client.report(step, loss=loss.item())  # never blocks, never raises

Framework integrations live in their own modules and import their framework lazily:
``lrpilot.torch.LRPilot``, ``lrpilot.keras.LRPilotCallback``,
``lrpilot.lightning.LRPilotCallback`` and ``lrpilot.hf.LRPilotCallback``.
"""

from ._client import Backoff, Client, ClientStats
from ._decisions import Decision, DecisionKind, Halted
from ._protocol import PROTOCOL_VERSION, ProtocolError
from ._transport import Connection, Transport, TransportClosed, WebSocketTransport

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Backoff",
    "Client",
    "ClientStats",
    "Connection",
    "Decision",
    "DecisionKind",
    "Halted",
    "ProtocolError",
    "Transport",
    "TransportClosed",
    "WebSocketTransport",
    "__version__",
]
