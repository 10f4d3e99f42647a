"""The message format the centre and the sites speak: one module, imported by ``client/`` and ``server/``.

Flower carries a :class:`flwr.app.RecordDict` per message; these are the names of its records and of the keys inside
them. Both sides import the names from here, so a key renamed on one side cannot silently stop matching the other.
Plain strings only: this module is part of the framework-free core and imports nothing.

A train or evaluate **instruction** (centre → site) holds

- ``arrays`` (:data:`ARRAYS`): the global model's state dict;
- ``config`` (:data:`CONFIG`): :data:`SERVER_ROUND`, :data:`TOTAL_ROUNDS`, :data:`FEDERATION_ID` (keys a site's
  privacy ledger), on train messages :data:`EVALUATE_RECEIVED` (score the received model before training) and, when
  the model travels packed, :data:`PACKED_LAYOUT`.

A **reply** (site → centre) holds

- ``arrays``: the trained state dict (train replies only; packed in the instruction's layout when it came packed);
- ``metrics`` (:data:`METRICS`): aggregate numbers only, every key one of :data:`REPLY_METRIC_KEYS`, with
  :data:`WEIGHT_KEY` = training slices (train) or test cases (evaluate), which FedAvg weights by;
- ``site`` (:data:`SITE`): a ConfigRecord with the site's name under :data:`SITE_NAME` and nothing else.

A **query** (centre → site, Flower's ``MessageType.QUERY``) asks a newly seen node what it is, before any model is
sent to it: its ``config`` holds :data:`SERVER_ROUND` only. The reply's ``site`` record holds :data:`SITE_NAME` and
:data:`ROLE` (one of :data:`ROLES`), metadata only. A site's role is set in its own node config (the site config's
``role``), never by the centre: an :data:`EVALUATE_ONLY` site (the external hospital) only ever scores the global
model on all of its cases, never receives a train message (the centre samples training sites only) and refuses one
that reaches it anyway.
"""

from __future__ import annotations

# Record names of a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SITE_NAME = "name"
# When the model travels packed (braintumnet/packing.py: deployments, where Flower sends one request per object):
# ``arrays`` holds one flat array per dtype under PACKED_PREFIX + dtype name, and the instruction's ``config`` holds
# the layout (bytes) under PACKED_LAYOUT. A site replies packed in that same layout, without the layout.
PACKED_PREFIX = "packed."
PACKED_LAYOUT = "packed-layout"
# A site's role: the key of a query reply's ``site`` record, and the node-config key the launcher writes.
ROLE = "role"
TRAINING = "training"  # trains and evaluates (every site without a role)
EVALUATE_ONLY = "evaluate-only"  # scores the global model every round, never trains, never sends arrays
ROLES = (TRAINING, EVALUATE_ONLY)

# Instruction config keys.
SERVER_ROUND = "server-round"
TOTAL_ROUNDS = "total-rounds"
FEDERATION_ID = "federation-id"
EVALUATE_RECEIVED = "evaluate-received"

# Reply metric keys.
WEIGHT_KEY = "num-examples"
SECONDS = "seconds"
# Evaluation metrics every site sends, always all of them (Flower aborts the round on differing keys).
EVAL_KEYS = ("dice_tumor", "iou_tumor", "hd95_tumor_mm", "hd_tumor_mm", "dice_edema", "dice_whole", "acc",
             "sensitivity", "specificity", "f1", "auc", "miss_rate_tumor", "n_cases")
TRAIN_KEYS = ("train_loss", "train_loss_seg", "train_loss_cls")
# Train replies, only when dp.enabled (every site shares the run config): the site's cumulative ε, and 1 when the
# site refused to train because the round would exceed its budget.
DP_EPSILON = "dp_epsilon"
DP_BUDGET_SPENT = "dp_budget_spent"
DP_KEYS = (DP_EPSILON, DP_BUDGET_SPENT)
# A train message with EVALUATE_RECEIVED asks the site to score the global model it received (the previous round's)
# before training: the reply carries those metrics under this prefix, so a round needs one model download per site
# instead of two (docs/federation.md, "evaluate-in-train").
RECEIVED_PREFIX = "received_"
RECEIVED_KEYS = tuple(RECEIVED_PREFIX + k for k in EVAL_KEYS + (WEIGHT_KEY,))
# The seconds that scoring took inside a train reply's SECONDS (with EVALUATE_RECEIVED): the centre's forecast of
# when the site's reply to an evaluate message is due (server/polling.py), the run's final evaluation included.
EVALUATE_SECONDS = "evaluate_seconds"
# Every key a reply's MetricRecord may hold; the message audit allows nothing else.
REPLY_METRIC_KEYS = frozenset(TRAIN_KEYS + DP_KEYS + EVAL_KEYS + RECEIVED_KEYS
                              + (WEIGHT_KEY, SECONDS, EVALUATE_SECONDS))
# Per-site timings and privacy figures: logged per site; a weighted mean of them means nothing (the federation's ε
# is each site's own, summarised as the maximum in the round's ``privacy`` entry).
NOT_AVERAGED = frozenset({SECONDS, EVALUATE_SECONDS, DP_EPSILON, DP_BUDGET_SPENT})

# The run config's ``sites`` list names the simulated sites, partition i being entry i; an entry ``NAME:ROLE`` gives
# that simulated site a role (``external:evaluate-only``), as a deployed site's own node config does.
ROLE_SEPARATOR = ":"


def site_entry(entry: str) -> tuple[str, str]:
    """``(name, role)`` of one entry of the run config's ``sites`` (``NAME`` or ``NAME:ROLE``).

    Raises:
        ValueError: an empty name or an unknown role, naming the entry and the roles.
    """
    name, _, role = entry.strip().partition(ROLE_SEPARATOR)
    name, role = name.strip(), role.strip() or TRAINING
    if not name or role not in ROLES:
        raise ValueError(f"sites entry {entry!r}: use NAME or NAME:ROLE with ROLE one of {', '.join(ROLES)} "
                         "(e.g. external:evaluate-only)")
    return name, role
