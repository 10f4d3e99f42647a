"""The coordinating centre: the Flower ServerApp (``server.app``), its FedAvg strategy (``server.strategy``) and the
parts it coordinates (settings, sites, transport, audit, screening, aggregation, rounds, server optimizers), the run
folder with checkpoints and resume (``server.checkpoints``) and MLflow tracking (``server.tracking``)."""
