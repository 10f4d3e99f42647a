"""The packed model (braintumnet/packing.py): bit-exact round trips, hostile layouts refused with a clear message, and
the centre's transport packing instructions and unpacking replies over a grid, refusing a reply that does not match.

The loopback deployment (tests/federation/test_loopback.py) runs the packed form end to end through Flower's network
grid; these check the rules in a second.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from braintumnet.engine import build_model
from braintumnet.errors import BrainTumNetError
from braintumnet.packing import PackingError, decode_layout, encode_layout, is_packed, layout_of, pack, unpack
from braintumnet.protocol import ARRAYS, PACKED_LAYOUT, PACKED_PREFIX

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
    assert set(packed) == {PACKED_PREFIX + d for d in ("float32", "int64", "float64", "bool")} | {PACKED_LAYOUT}
    assert all(v.ndim == 1 for v in packed.values())
    assert same_bits(unpack(packed, layout_of(state)), state)
    # as the site receives it: CPU torch tensors (Flower's to_torch_state_dict)
    assert same_bits(unpack({k: torch.from_numpy(v) for k, v in packed.items()}), state)


def test_the_model_packs_into_one_array_and_back(tiny_profile):
    state = {k: v.numpy() for k, v in build_model(tiny_profile).state_dict().items()}
    packed = pack(state)
    assert len(packed) == 2 and len(state) > 100  # one float32 vector and the layout instead of a few hundred
    assert same_bits(unpack(packed, layout_of(state)), state)


def tampered(edit) -> dict[str, np.ndarray]:
    """The packed mixed state with its layout document edited by ``edit(doc)``."""
    packed = pack(mixed_state())
    doc = json.loads(packed[PACKED_LAYOUT].tobytes())
    edit(doc)
    packed[PACKED_LAYOUT] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    return packed


def _set(doc, i, field, value):
    doc["tensors"][i][field] = value


def _raw(data: bytes) -> dict:
    packed = pack(mixed_state())
    packed[PACKED_LAYOUT] = np.frombuffer(data, np.uint8)
    return packed


HOSTILE = {
    "shape changed": lambda: tampered(lambda d: _set(d, 0, 2, [4, 6])),
    "tensor renamed": lambda: tampered(lambda d: _set(d, 0, 0, "enc.conv.other")),
    "two tensors swapped": lambda: tampered(lambda d: d["tensors"].reverse()),
    "offset shifted": lambda: tampered(lambda d: _set(d, 6, 3, 25)),
    "dtype changed": lambda: tampered(lambda d: _set(d, 6, 1, "int32")),
    "object dtype": lambda: tampered(lambda d: _set(d, 0, 1, "object")),
    "negative dim": lambda: tampered(lambda d: _set(d, 0, 2, [-4, 3, 2])),
    "huge dims": lambda: tampered(lambda d: _set(d, 0, 2, [2**62, 2**62])),
    "float dim": lambda: tampered(lambda d: _set(d, 0, 2, [4.0, 3, 2])),
    "bool offset": lambda: tampered(lambda d: _set(d, 0, 3, False)),
    "name twice": lambda: tampered(lambda d: _set(d, 1, 0, "enc.conv.weight")),
    "short entry": lambda: tampered(lambda d: d["tensors"].__setitem__(0, ["x", "float32"])),
    "tensor dropped": lambda: tampered(lambda d: d["tensors"].pop()),
    "unknown format": lambda: tampered(lambda d: d.__setitem__("format", 2)),
    "extra field": lambda: tampered(lambda d: d.__setitem__("note", "hi")),
    "not JSON": lambda: _raw(b"\x80\xff not json"),
    "JSON but a list": lambda: _raw(b"[1, 2]"),
    "deeply nested": lambda: _raw(b"[" * 100000 + b"]" * 100000),
    "layout not uint8": lambda: {**pack(mixed_state()), PACKED_LAYOUT: np.zeros(3, np.float32)},
    "extra array": lambda: {**pack(mixed_state()), PACKED_PREFIX + "int8": np.zeros(2, np.int8)},
    "array missing": lambda: {k: v for k, v in pack(mixed_state()).items() if k != PACKED_PREFIX + "bool"},
    "array too short": lambda: {**pack(mixed_state()), PACKED_PREFIX + "float32": np.zeros(3, np.float32)},
    "array of another dtype": lambda: {**pack(mixed_state()), PACKED_PREFIX + "int64": np.zeros(6, np.int32)},
    "array not flat": lambda: {**pack(mixed_state()), PACKED_PREFIX + "int64": np.zeros((2, 3), np.int64)},
    "no layout": lambda: {k: v for k, v in pack(mixed_state()).items() if k != PACKED_LAYOUT},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_tampered_packed_model_is_refused_with_a_clear_message(case):
    received = HOSTILE[case]()
    with pytest.raises(PackingError) as err:  # never another exception
        unpack(received, layout_of(mixed_state()))
    assert isinstance(err.value, BrainTumNetError) and len(str(err.value)) > 20


def test_a_consistent_layout_of_another_model_is_refused_against_the_expected_one():
    other = {**mixed_state(), "head.bias": np.zeros(3, np.float32)}  # one shape differs, laid out consistently
    unpack(pack(other))  # consistent in itself
    with pytest.raises(PackingError, match="not the one expected.*head.bias"):
        unpack(pack(other), layout_of(mixed_state()))


def test_the_layout_survives_encoding():
    layout = layout_of(mixed_state())
    assert decode_layout(np.frombuffer(encode_layout(layout), np.uint8)) == layout


# ---- the centre's transport -----------------------------------------------------------------------------------------


class EchoGrid(Grid):
    """Nodes answer at once with ``answer[node](received arrays as numpy) -> reply arrays``; records what they got."""

    def __init__(self, answer: dict):
        self.answer, self.pending, self.received = answer, {}, {}

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
            self.received[node] = got
            arrays = ArrayRecord({k: Array(np.array(v)) for k, v in self.answer[node](got).items()})
            reply = Message(RecordDict({ARRAYS: arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def trained(got: dict) -> dict:
    """A well-behaved site: unpacks, changes the float weights, packs the reply as it received it."""
    state = {k: (v + 1).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in unpack(got).items()}
    return pack(state)


def test_the_centre_sends_packed_and_hands_the_strategy_each_tensor_again():
    from server.transport import RecordingGrid

    state = mixed_state()
    hostile = {
        11: trained,
        12: lambda got: HOSTILE["shape changed"](),
        13: lambda got: pack({**unpack(got), "extra": np.zeros(2, np.float32)}),  # consistent, not the model sent
        14: lambda got: {**trained(got), PACKED_LAYOUT: np.frombuffer(b"{" * 50, np.uint8)},
    }
    grid = EchoGrid(hostile)
    recording = RecordingGrid(grid, pack=True)
    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    messages = [Message(RecordDict({ARRAYS: arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                        message_type="train") for n in hostile]
    replies = {recording.last.sent.get(r.metadata.reply_to_message_id): r
               for r in recording.send_and_receive(messages)}
    assert all(is_packed(got) for got in grid.received.values())  # what travelled: the packed form
    assert recording.last.bytes_in[11] >= sum(v.nbytes for v in state.values())
    good = replies[11]
    assert not good.has_error() and not is_packed(good.content[ARRAYS])
    back = {k: a.numpy() for k, a in good.content[ARRAYS].items()}
    assert same_bits(back, {k: (v + 1).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in state.items()})
    for node in (12, 13, 14):
        assert replies[node].has_error(), node
        assert replies[node].error.reason.startswith("packed model refused:"), replies[node].error.reason
    assert "not the one expected" in replies[13].error.reason
    assert arrays is messages[0].content[ARRAYS] and not is_packed(messages[0].content[ARRAYS])  # sender untouched


def test_without_packing_the_messages_go_as_they_are():
    from server.transport import RecordingGrid

    grid = EchoGrid({11: lambda got: got})
    arrays = ArrayRecord({k: Array(v) for k, v in mixed_state().items()})
    msg = Message(RecordDict({ARRAYS: arrays}), dst_node_id=11, message_type="train")
    [reply] = RecordingGrid(grid).send_and_receive([msg])  # a grid that is not Flower's network grid
    assert not is_packed(grid.received[11]) and same_bits({k: a.numpy() for k, a in reply.content[ARRAYS].items()},
                                                          mixed_state())


def test_the_site_unpacks_what_it_receives(tiny_profile):
    from braintumnet.site_round import _global_model

    model = build_model(tiny_profile)
    state = {k: v + 0.5 for k, v in model.state_dict().items()}
    received = {k: torch.from_numpy(v) for k, v in pack({k: v.numpy() for k, v in state.items()}).items()}
    loaded = _global_model(received, tiny_profile).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    received[PACKED_LAYOUT] = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(PackingError, match="layout"):
        _global_model(received, tiny_profile)
