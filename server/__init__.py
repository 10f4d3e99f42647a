"""The coordinating centre: the Flower ServerApp (``server.app``), its FedAvg strategy (``server.strategy``), the run
folder with checkpoints and resume (``server.checkpoints``) and MLflow tracking (``server.tracking``)."""
