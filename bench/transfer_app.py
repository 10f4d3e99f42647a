"""The Flower app and SuperNode wrapper of the transfer benchmark (``bench/transfer.py``), as source text: written
to the benchmark's work folder and built into a FAB by ``flwr run``.

The ServerApp sends the model to the one site, one message at a time, the two forms alternating (after one warm-up
message of each), polls every 20 ms for the reply and writes each message's timestamps to ``result-path``; the
ClientApp turns the received arrays into torch tensors, as the site's ClientApp does, and sends them straight back in
the same form, with its own start and end times.
"""

# The benchmark's own Flower app: written to the work folder, built into a FAB by `flwr run`.
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "transferbench"
version = "1.0.0"
license = { file = "LICENSE" }
dependencies = ["flwr>=1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "braintumnet"
fab-format-version = 1
flwr-version-target = "1.42.0"

[tool.flwr.app.components]
serverapp = "transferbench.server:app"
clientapp = "transferbench.client:app"

[tool.flwr.app.config]
state-path = ""
result-path = ""
reps = 3
"""

APP_COMMON = '''\
"""Both forms of the state dict: one Array per tensor, or one flat array per dtype with a layout."""
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord


def per_tensor(state):
    return {"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})}


def flat(state):
    names = list(state)
    offsets, at = [], 0
    for k in names:
        offsets.append(at)
        at += state[k].size
    vector = np.concatenate([np.ravel(state[k]).astype(np.float32, copy=False) for k in names])
    layout = ConfigRecord({"names": names, "ndims": [state[k].ndim for k in names],
                           "shape": [d for k in names for d in state[k].shape], "offsets": offsets})
    return {"arrays": ArrayRecord({"flat": Array(vector)}), "layout": layout}


def unflat(content):
    vector = content["arrays"]["flat"].numpy()
    layout = content["layout"]
    dims = iter(layout["shape"])
    out = {}
    for name, ndim, offset in zip(layout["names"], layout["ndims"], layout["offsets"]):
        shape = tuple(next(dims) for _ in range(ndim))
        out[name] = vector[offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(shape)
    return out
'''

APP_SERVER = '''\
import json
import time

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from transferbench.common import flat, per_tensor

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    state = dict(np.load(cfg["state-path"]))
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    found = []
    for rep in range(-1, int(cfg["reps"])):  # rep -1: a warm-up of each form, not counted
        for form in (("per-tensor", "flat") if rep % 2 == 0 else ("flat", "per-tensor")):
            content = RecordDict(per_tensor(state) if form == "per-tensor" else flat(state))
            msg = Message(content, dst_node_id=nodes[0], message_type="train")
            t0 = time.time()
            ids = list(grid.push_messages([msg]))
            t1 = time.time()
            while True:
                p0 = time.time()
                got = list(grid.pull_messages(ids))
                p1 = time.time()
                if got:
                    break
                time.sleep(0.02)
            reply = got[0]
            assert not reply.has_error(), reply.error
            timing = dict(reply.content["timing"])
            found.append({"form": form, "rep": rep, "push_start": t0, "push_end": t1, "pull_start": p0,
                          "reply_done": p1, "message_id": ids[0], **timing})
            time.sleep(0.5)
    with open(cfg["result-path"], "w") as fh:
        json.dump(found, fh)
'''

APP_CLIENT = '''\
import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from transferbench.common import flat, per_tensor, unflat

app = ClientApp()


@app.train()
def echo(msg: Message, context: Context) -> Message:
    start = time.time()
    if "layout" in msg.content:
        state = {k: torch.from_numpy(v.copy()) for k, v in unflat(msg.content).items()}
        arrays = {k: v.numpy() for k, v in state.items()}
        content = flat(arrays)
    else:
        state = msg.content["arrays"].to_torch_state_dict()
        content = per_tensor({k: v.numpy() for k, v in state.items()})
    reply = RecordDict(content)
    reply["timing"] = MetricRecord({"app_start": start, "app_end": time.time()})
    return Message(reply, reply_to=msg)
'''

# The SuperNode with a timestamp on each of Flower's log lines (its own format has none): Flower's own, or the one
# the site launcher runs (client/supernode.py: shorter waits between looks for a message and for the reply).
SUPERNODE_WRAPPER = (
    "import logging, sys\n"
    "h = logging.StreamHandler(sys.stdout)\n"
    "h.setFormatter(logging.Formatter('TS %(created).4f %(message)s'))\n"
    "logging.getLogger('flwr').addHandler(h)\n"
    "if sys.argv[1] == 'project':\n"
    "    sys.path.insert(0, sys.argv[2])\n"
    "    del sys.argv[1:3]\n"
    "    from client.supernode import main\n"
    "    main()\n"
    "del sys.argv[1:3]\n"
    "from flwr.supernode.cli import flower_supernode\n"
    "sys.argv[0] = 'flower-supernode'\n"
    "flower_supernode()\n")
