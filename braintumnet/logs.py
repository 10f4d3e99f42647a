"""Logging for processes that start without handlers (each Flower ClientApp / ServerApp process)."""

import logging


def setup_logging() -> None:
    """Our INFO lines on stderr, beside Flower's (which mirrors them into the SuperNode output and ``flwr log``)."""
    root = logging.getLogger("braintumnet")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
