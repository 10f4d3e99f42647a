"""The packed model (braintumnet/packing.py): bit-exact round trips, hostile layouts refused with a clear message, and
the centre's transport packing instructions and unpacking replies over a grid, refusing a reply that does not match.

The loopback deployment (tests/federation/test_loopback.py) runs the packed form end to end through Flower's network
grid; these check the rules in a second.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from braintumnet.engine import build_model
from braintumnet.errors import BrainTumNetError
from braintumnet.packing import (PackingError, decode_layout, encode_layout, is_packed, layout_of, pack, unpack,
                                 vector_key)
from braintumnet.protocol import ARRAYS, CONFIG, PACKED_LAYOUT, PACKED_PREFIX

# Flower's Message constructor reads the process's task identity: the shared fixture in tests/conftest.py sets one.
pytestmark = pytest.mark.usefixtures("task_identity")


def mixed_state() -> dict[str, np.ndarray]:
    """Every kind a state dict may hold: float32 weights with NaN payloads and -0.0, a float64 buffer, int64
    counters (one a scalar), a bool mask and an empty tensor."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2)).astype(np.float32)
    w.view(np.uint32)[0, 0, 0] = 0x7FC00123  # a NaN with a payload: only a bit-exact copy keeps it
    w[0, 0, 1] = -0.0
    return {"enc.conv.weight": w, "enc.bn.num_batches_tracked": np.array(7, dtype=np.int64),
            "enc.bn.running_var": rng.random(3),  # float64
            "head.steps": np.arange(5, dtype=np.int64), "head.mask": np.array([True, False, True]),
            "head.empty": np.zeros((0, 4), np.float32), "head.bias": rng.standard_normal(2).astype(np.float32)}


def same_bits(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
                                      and np.asarray(a[k]).shape == np.asarray(b[k]).shape
                                      and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def test_round_trip_is_bit_exact_and_keeps_every_dtype():
    state = mixed_state()
    packed = pack(state)
    layout = layout_of(state)
    assert set(packed) == {vector_key(d, layout) for d in ("float32", "int64", "float64", "bool")}  # no layout array
    assert all(k.startswith(PACKED_PREFIX) for k in packed)
    assert all(v.ndim == 1 for v in packed.values()) and is_packed(packed) and not is_packed(state)
    assert same_bits(unpack(packed, layout_of(state)), state)
    # as the site receives it: CPU torch tensors (Flower's to_torch_state_dict)
    assert same_bits(unpack({k: torch.from_numpy(v) for k, v in packed.items()}, layout_of(state)), state)


def test_the_model_packs_into_one_array_and_back(tiny_profile):
    state = {k: v.numpy() for k, v in build_model(tiny_profile).state_dict().items()}
    packed = pack(state)
    assert len(packed) == 1 and len(state) > 100  # one float32 vector instead of a few hundred arrays
    assert same_bits(unpack(packed, layout_of(state)), state)


def test_a_reply_is_packed_in_the_layout_received_whatever_its_own_order():
    state = mixed_state()
    layout = layout_of(state)
    reordered = dict(reversed(list(state.items())))  # e.g. a model whose state dict lists its tensors otherwise
    assert same_bits(pack(reordered, layout), pack(state))
    with pytest.raises(PackingError, match="the layout describes"):  # packed in its own order, not the one sent
        unpack(pack(reordered), layout)
    with pytest.raises(PackingError, match="missing.*head.bias"):
        pack({k: v for k, v in state.items() if k != "head.bias"}, layout)
    with pytest.raises(PackingError, match="head.bias.*layout says float32 \\[2\\]"):
        pack({**state, "head.bias": np.zeros(3, np.float32)}, layout)
    with pytest.raises(PackingError, match="head.steps.*int32"):
        pack({**state, "head.steps": np.arange(5, dtype=np.int32)}, layout)


def edited(edit) -> bytes:
    """The mixed state's layout document edited by ``edit(doc)``, encoded as it travels."""
    doc = json.loads(encode_layout(layout_of(mixed_state())))
    edit(doc)
    return json.dumps(doc).encode()


def _set(doc, i, field, value):
    doc["tensors"][i][field] = value


# Layouts a hostile or broken centre could send: refused when decoded, or when the arrays do not fit them.
HOSTILE_LAYOUTS = {
    "shape grown": edited(lambda d: _set(d, 0, 2, [4, 3, 3])),
    "two tensors swapped": edited(lambda d: d["tensors"].reverse()),
    "offset shifted": edited(lambda d: _set(d, 6, 3, 25)),
    "dtype changed": edited(lambda d: _set(d, 6, 1, "int32")),
    "object dtype": edited(lambda d: _set(d, 0, 1, "object")),
    "negative dim": edited(lambda d: _set(d, 0, 2, [-4, 3, 2])),
    "huge dims": edited(lambda d: _set(d, 0, 2, [2**62, 2**62])),
    "float dim": edited(lambda d: _set(d, 0, 2, [4.0, 3, 2])),
    "bool offset": edited(lambda d: _set(d, 0, 3, False)),
    "name twice": edited(lambda d: _set(d, 1, 0, "enc.conv.weight")),
    "short entry": edited(lambda d: d["tensors"].__setitem__(0, ["x", "float32"])),
    "tensor dropped": edited(lambda d: d["tensors"].pop()),
    "unknown format": edited(lambda d: d.__setitem__("format", 2)),
    "extra field": edited(lambda d: d.__setitem__("note", "hi")),
    "not JSON": b"\x80\xff not json",
    "JSON but a list": b"[1, 2]",
    "deeply nested": b"[" * 100000 + b"]" * 100000,
    "not bytes": "{}",
    "too long": b" " * (4 * 2**20 + 1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LAYOUTS))
def test_a_hostile_layout_is_refused_with_a_clear_message(case):
    with pytest.raises(PackingError) as err:  # never another exception
        unpack(pack(mixed_state()), decode_layout(HOSTILE_LAYOUTS[case]))
    assert isinstance(err.value, BrainTumNetError) and len(str(err.value)) > 20


def key(dtype: str) -> str:
    return vector_key(dtype, layout_of(mixed_state()))


# Arrays a hostile or broken site could send back for the layout the centre sent.
HOSTILE_ARRAYS = {
    "extra array": lambda: {**pack(mixed_state()), key("int8"): np.zeros(2, np.int8)},
    "array missing": lambda: {k: v for k, v in pack(mixed_state()).items() if k != key("bool")},
    "array too short": lambda: {**pack(mixed_state()), key("float32"): np.zeros(3, np.float32)},
    "array of another dtype": lambda: {**pack(mixed_state()), key("int64"): np.zeros(6, np.int32)},
    "array not flat": lambda: {**pack(mixed_state()), key("int64"): np.zeros((2, 3), np.int64)},
    "a layout sent back": lambda: {**pack(mixed_state()), PACKED_PREFIX + "layout": np.zeros(4, np.uint8)},
    "not an array": lambda: {**pack(mixed_state()), key("float32"): object()},
    "keys without the layout's name": lambda: {k.split("@")[0]: v for k, v in pack(mixed_state()).items()},
    "another layout's name": lambda: pack(dict(reversed(list(mixed_state().items())))),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARRAYS))
def test_arrays_that_do_not_fit_the_layout_are_refused_with_a_clear_message(case):
    with pytest.raises(PackingError) as err:
        unpack(HOSTILE_ARRAYS[case](), layout_of(mixed_state()))
    assert isinstance(err.value, BrainTumNetError) and len(str(err.value)) > 20


def test_the_layout_survives_encoding():
    layout = layout_of(mixed_state())
    assert decode_layout(encode_layout(layout)) == layout


# ---- the centre's transport -----------------------------------------------------------------------------------------


class EchoGrid(Grid):
    """Nodes answer at once with ``answer[node](received arrays as numpy, the config's layout) -> reply arrays``;
    records what they got."""

    def __init__(self, answer: dict):
        self.answer, self.pending, self.received, self.layouts = answer, {}, {}, {}

    def set_run(self, run): pass

    @property
    def run(self): return None

    def create_message(self, *a, **k): raise NotImplementedError

    def get_node_ids(self): return list(self.answer)

    def get_nodes(self): return []

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pending[m.object_id] = m
        return [m.object_id for m in messages]

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid)
            node = msg.metadata.dst_node_id
            got = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
            config = msg.content.config_records.get(CONFIG)
            self.received[node], self.layouts[node] = got, None if config is None else config.get(PACKED_LAYOUT)
            arrays = ArrayRecord({k: Array(np.array(v)) for k, v in self.answer[node](got, self.layouts[node]).items()})
            reply = Message(RecordDict({ARRAYS: arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def plus_one(state: dict) -> dict:
    return {k: (v + 1).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in state.items()}


def trained(got: dict, layout: bytes) -> dict:
    """A well-behaved site: unpacks, changes the float weights, packs the reply in the layout it received."""
    return pack(plus_one(unpack(got, decode_layout(layout))), decode_layout(layout))


def test_the_centre_sends_packed_and_hands_the_strategy_each_tensor_again():
    from server.transport import RecordingGrid

    state = mixed_state()
    hostile = {
        11: trained,
        12: lambda got, layout: HOSTILE_ARRAYS["array too short"](),
        13: lambda got, layout: pack({**plus_one(state), "extra": np.zeros(2, np.float32)}),  # not the model sent
        14: lambda got, layout: {**trained(got, layout), PACKED_PREFIX + "layout": np.frombuffer(layout, np.uint8)},
    }
    grid = EchoGrid(hostile)
    recording = RecordingGrid(grid, pack=True)
    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    config = ConfigRecord({"server-round": 1})
    messages = [Message(RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=n, message_type="train")
                for n in hostile]
    replies = {recording.last.sent.get(r.metadata.reply_to_message_id): r
               for r in recording.send_and_receive(messages)}
    # what travelled: the packed arrays, one per dtype, and the layout in the config record beside the round
    assert all(set(got) == set(pack(state)) for got in grid.received.values())
    assert all(decode_layout(layout) == layout_of(state) for layout in grid.layouts.values())
    assert recording.last.bytes_in[11] >= sum(v.nbytes for v in state.values())
    good = replies[11]
    assert not good.has_error() and not is_packed(good.content[ARRAYS])
    assert same_bits({k: a.numpy() for k, a in good.content[ARRAYS].items()}, plus_one(state))
    for node in (12, 13, 14):
        assert replies[node].has_error(), node
        assert replies[node].error.reason.startswith("packed model refused:"), replies[node].error.reason
    # the strategy's own message is left as it was: one array per tensor, no layout in its config
    assert arrays is messages[0].content[ARRAYS] and not is_packed(messages[0].content[ARRAYS])
    assert PACKED_LAYOUT not in messages[0].content[CONFIG]


def test_a_packed_reply_to_an_instruction_sent_unpacked_is_refused():
    from server.transport import RecordingGrid

    grid = EchoGrid({11: lambda got, layout: pack(got)})
    msg = Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in mixed_state().items()})}),
                  dst_node_id=11, message_type="train")
    [reply] = RecordingGrid(grid, pack=False).send_and_receive([msg])
    assert reply.has_error() and "sent none" in reply.error.reason


def test_without_packing_the_messages_go_as_they_are():
    from server.transport import RecordingGrid

    grid = EchoGrid({11: lambda got, layout: got})
    arrays = ArrayRecord({k: Array(v) for k, v in mixed_state().items()})
    msg = Message(RecordDict({ARRAYS: arrays}), dst_node_id=11, message_type="train")
    [reply] = RecordingGrid(grid).send_and_receive([msg])  # a grid that is not Flower's network grid
    assert not is_packed(grid.received[11]) and grid.layouts[11] is None
    assert same_bits({k: a.numpy() for k, a in reply.content[ARRAYS].items()}, mixed_state())


# ---- the site's ClientApp ------------------------------------------------------------------------------------------


def packed_instruction(state: dict, layout: bytes | None = None) -> Message:
    """``state`` packed as the centre sends it; with ``layout``, that layout in the config and, where it decodes,
    the arrays keyed by it (as a centre that sent it would have)."""
    numpy_state = {k: v.numpy() for k, v in state.items()}
    vectors = pack(numpy_state)
    try:
        claimed = decode_layout(layout) if layout is not None else None
    except PackingError:
        claimed = None
    if claimed is not None:
        vectors = {vector_key(k.split("@")[0][len(PACKED_PREFIX):], claimed): v for k, v in vectors.items()}
    return Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in vectors.items()}),
                               CONFIG: ConfigRecord({"server-round": 1,
                                                     PACKED_LAYOUT: layout or encode_layout(layout_of(numpy_state))})}),
                   dst_node_id=11, message_type="train")


def test_the_site_unpacks_what_it_receives_and_replies_in_the_same_layout(tiny_profile):
    from braintumnet.site_round import _global_model
    from client.app import _global_state, _reply

    model = build_model(tiny_profile)
    state = {k: v + 0.5 for k, v in model.state_dict().items()}
    msg = packed_instruction(state)
    loaded = _global_model(_global_state(msg), tiny_profile).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    trained_state = {k: v + 1 for k, v in loaded.items()}
    reply = _reply(msg, SimpleNamespace(name="yibin"), {"num-examples": 1}, trained_state)
    sent = reply.content[ARRAYS]
    assert is_packed(sent) and len(sent) == 1  # the arrays only: the centre knows the layout it sent
    back = unpack({k: a.numpy() for k, a in sent.items()}, decode_layout(msg.content[CONFIG][PACKED_LAYOUT]))
    assert all(np.array_equal(back[k], trained_state[k].numpy()) for k in state)


def test_the_site_refuses_a_layout_that_does_not_fit_its_model(tiny_profile):
    from braintumnet.site_round import _global_model
    from client.app import _global_state

    state = build_model(tiny_profile).state_dict()
    with pytest.raises(PackingError, match="layout"):
        _global_state(packed_instruction(state, b"{" * 50))
    # a layout that fits the model but gives a weight another dtype: refused before any training, since the reply
    # could not be packed in it afterwards
    doc = json.loads(encode_layout(layout_of({k: v.numpy() for k, v in state.items()})))
    weights = [i for i, entry in enumerate(doc["tensors"]) if entry[1] == "float32"]
    name = doc["tensors"][weights[-1]][0]
    as_float64 = {**{k: v for k, v in state.items()}, name: state[name].double()}
    with pytest.raises(BrainTumNetError, match=f"{name}.*float64.*float32"):
        _global_model(_global_state(packed_instruction(as_float64)), tiny_profile)
    # consistent in itself and fitting the arrays, not this model: the model refuses it as it loads
    for tensor, field, value in ((0, 0, "renamed.weight"), (0, 2, None)):
        doc = json.loads(encode_layout(layout_of({k: v.numpy() for k, v in state.items()})))
        entry = doc["tensors"][tensor]
        entry[field] = value if value is not None else [int(np.prod(entry[2]))]  # the same elements, flattened
        with pytest.raises(BrainTumNetError, match="do not fit the model"):
            _global_model(_global_state(packed_instruction(state, json.dumps(doc).encode())), tiny_profile)
