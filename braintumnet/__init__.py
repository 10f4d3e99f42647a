"""BrainTumNet-FL: the framework-free core (data, model, losses, metrics, engine).

Nothing in this package imports ``flwr``: the centralized baseline, the tests and the Flower apps in ``client/`` and
``server/`` all call the same code.
"""

__version__ = "0.1.0"
