"""The centre polls for replies when they are due (server/polling.py), on a fake clock: scripted sites answer after
known seconds, and the test counts how late each reply was noticed and how many polls it took."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.polling import POLL_FAST_S, POLL_MIN_S, POLL_S, ReplyForecast, next_poll_wait

# Flower's Message constructor reads the process's task identity: the shared fixture in tests/conftest.py sets one.
pytestmark = pytest.mark.usefixtures("task_identity")


class Clock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.now += seconds


class TimedGrid(Grid):
    """Each node answers ``work[node]`` seconds of work plus ``transfer`` seconds after the push."""

    def __init__(self, clock: Clock, work: dict[int, float], transfer: float = 0.3, download: float = 0.0,
                 scoring: dict[int, float] | None = None):
        self.clock, self.work, self.transfer, self.download = clock, work, transfer, download
        self.scoring = scoring  # a train reply's evaluate_seconds per node (None: not sent)
        self.pending: dict[str, tuple[float, Message]] = {}

    def set_run(self, run): pass

    @property
    def run(self): return None

    def create_message(self, *a, **k): raise NotImplementedError

    def get_node_ids(self): return list(self.work)

    def get_nodes(self): return []

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            ready = self.clock.now + self.work[m.metadata.dst_node_id] + self.transfer
            self.pending[m.object_id] = (ready, m)
        return [m.object_id for m in messages]

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            ready, msg = self.pending[mid]
            if ready > self.clock.now:
                continue
            del self.pending[mid]
            self.clock.now += self.download  # fetching the reply's objects takes time once the reply is seen
            node = msg.metadata.dst_node_id
            metrics = {"num-examples": 1, "seconds": self.work[node]}
            if self.scoring is not None and msg.metadata.message_type == "train":
                metrics["evaluate_seconds"] = self.scoring[node]
            reply = Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            out.append((ready, reply))
        return [r for _, r in out]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def exchange(recording, grid, clock, kind="train"):
    """One send-and-receive: how long after the last reply was ready the centre noticed it, and the polls."""
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=n, message_type=kind)
                for n in grid.work]
    start = clock.now
    replies = list(recording.send_and_receive(messages))
    assert len(replies) == len(grid.work) and not any(r.has_error() for r in replies)
    last_ready = start + max(grid.work.values()) + grid.transfer
    return clock.now - last_ready, recording.last.polls


@pytest.fixture
def clock(monkeypatch):
    import server.transport

    clock = Clock()
    monkeypatch.setattr(server.transport, "time", clock)
    return clock


def test_the_second_round_notices_each_reply_when_it_is_due(clock):
    from server.transport import RecordingGrid

    grid = TimedGrid(clock, {1: 7.3, 2: 11.1, 3: 23.7})
    recording = RecordingGrid(grid, pack=False)
    first_late, first_polls = exchange(recording, grid, clock)
    assert first_late > 1.0  # without a forecast: the growing rule's polls (2.4 s apart by then)
    second_late, second_polls = exchange(recording, grid, clock)
    assert second_late <= POLL_FAST_S + 1e-9, second_late
    assert second_polls <= first_polls + 3 * len(grid.work)  # a few polls at each due time, no flat fast polling
    evaluate_late, _ = exchange(recording, grid, clock, kind="evaluate")  # another kind: no forecast yet
    assert evaluate_late > POLL_FAST_S


def test_the_final_evaluation_is_polled_for_when_the_train_replies_said_scoring_takes(clock):
    """A training site's one evaluate message (the run's last model) is due after its train round trip's rest plus
    the seconds its train replies said scoring the received model took."""
    from server.transport import RecordingGrid

    scoring = {1: 0.35, 2: 0.6, 3: 2.2}
    grid = TimedGrid(clock, {1: 2.1, 2: 3.4, 3: 9.0}, transfer=0.45, scoring=scoring)
    recording = RecordingGrid(grid, pack=False)
    for _ in range(2):
        exchange(recording, grid, clock)
    grid.work = dict(scoring)  # an evaluate message's work is the scoring
    late, polls = exchange(recording, grid, clock, kind="evaluate")
    assert late <= POLL_FAST_S + 1e-9, late
    assert polls <= 3 * 7  # a handful around each due time
    grid.scoring = None  # without the figure: due at the rest alone, then the growing rule (0.5 s steps)
    recording = RecordingGrid(grid, pack=False)
    grid.work = {1: 2.1, 2: 3.4, 3: 9.0}
    for _ in range(2):
        exchange(recording, grid, clock)
    grid.work = dict(scoring)
    late_without, _ = exchange(recording, grid, clock, kind="evaluate")
    assert late_without > late


def test_the_forecast_is_never_later_than_the_reply_when_fetching_replies_takes_time(clock):
    """A pull that returns replies also downloads their objects: a reply arriving meanwhile is timed from the poll's
    request, not its return, so the forecast stays early."""
    from server.transport import RecordingGrid

    grid = TimedGrid(clock, {1: 3.0, 2: 3.05, 3: 3.1}, download=0.4)
    recording = RecordingGrid(grid, pack=False)
    for _ in range(3):
        exchange(recording, grid, clock)
        for node, work in grid.work.items():
            assert recording.forecast.due(node, "train") <= work + grid.transfer + 1e-9, node


def test_a_site_slower_than_forecast_is_polled_by_the_growing_rule(clock):
    from server.transport import RecordingGrid

    grid = TimedGrid(clock, {1: 5.0})
    recording = RecordingGrid(grid, pack=False)
    exchange(recording, grid, clock)
    grid.work[1] = 15.0  # three times slower this round
    late, polls = exchange(recording, grid, clock)
    assert late <= 0.1 * 15.3 + 1e-9  # noticed within a tenth of the wait, as without a forecast
    _, growing_polls = exchange(RecordingGrid(grid, pack=False), grid, clock)  # no forecast
    assert polls <= growing_polls + 6, (polls, growing_polls)  # the due time's polls, then the growing rule
    grid.work[1] = 1.0  # faster than forecast: the growing rule's polls still happen
    late, _ = exchange(recording, grid, clock)
    assert late <= POLL_MIN_S + 1e-9


def test_next_poll_wait_only_ever_brings_a_poll_forward():
    assert next_poll_wait(0.0, []) == POLL_MIN_S
    assert next_poll_wait(100.0, [None]) == POLL_S
    assert next_poll_wait(10.0, [10.4]) == pytest.approx(0.4)
    assert next_poll_wait(10.0, [50.0]) == pytest.approx(1.0)  # far off: the growing rule's own wait
    assert next_poll_wait(10.0, [10.0]) == POLL_FAST_S
    assert next_poll_wait(10.4, [10.0]) == POLL_FAST_S  # just due
    assert next_poll_wait(30.0, [10.0]) == POLL_S  # 20 s overdue: late, the growing rule
    assert next_poll_wait(30.0, [10.0, 30.5]) == pytest.approx(0.5)


def test_the_forecast_is_the_last_work_plus_the_rest_of_the_round_trip_taken_early():
    forecast = ReplyForecast()
    assert forecast.due(1, "train") is None
    forecast.observe(1, "train", earliest_s=11.0, seen_s=12.0, work_s=10.0)
    assert forecast.due(1, "train") == pytest.approx(11.0)  # arrived after 11 s at the earliest
    forecast.observe(1, "train", earliest_s=8.0, seen_s=9.0, work_s=8.5)  # the window opened before the work ended
    assert forecast.due(1, "train") == pytest.approx(8.5)
    forecast.observe(2, "train", earliest_s=3.0, seen_s=4.0, work_s=None)  # no reported seconds
    forecast.observe(3, "train", earliest_s=3.0, seen_s=4.0, work_s=1e9)  # a figure that cannot be: ignored likewise
    assert forecast.due(2, "train") == forecast.due(3, "train") == pytest.approx(3.0)


def test_a_kind_never_answered_is_due_after_the_shortest_rest_of_a_round_trip_of_the_others():
    forecast = ReplyForecast()
    forecast.observe(1, "query", earliest_s=0.9, seen_s=1.0, work_s=0.0)
    forecast.observe(1, "train", earliest_s=11.0, seen_s=12.0, work_s=10.0)
    forecast.observe(2, "query", earliest_s=0.4, seen_s=0.5, work_s=None)  # a query reply reports no seconds
    forecast.observe(2, "train", earliest_s=5.0, seen_s=6.0, work_s=4.0)
    forecast.observe(3, "query", earliest_s=0.4, seen_s=0.5, work_s=None)
    assert forecast.due(1, "evaluate") == pytest.approx(0.9)  # the query's round trip, the shorter of node 1's two
    assert forecast.due(2, "evaluate") == pytest.approx(1.0)  # its train message's rest: the query's is unknown
    assert forecast.due(3, "evaluate") is None  # no kind with reported work
    assert forecast.due(4, "evaluate") is None  # never answered anything
    assert forecast.due(1, "train") == pytest.approx(11.0)  # a kind it answered keeps its own forecast
    forecast.expect(2, "evaluate", 0.3)  # its train reply said scoring took 0.3 s
    assert forecast.due(2, "evaluate") == pytest.approx(1.3)
    forecast.observe(2, "evaluate", earliest_s=0.9, seen_s=1.0, work_s=0.4)  # once answered, its own figures
    assert forecast.due(2, "evaluate") == pytest.approx(0.9)
    # the borrowed due time only brings polls forward: at 1 s the reply is just due, polled for every POLL_FAST_S
    assert next_poll_wait(0.9, [forecast.due(2, "evaluate")]) == POLL_FAST_S


def test_the_grid_retries_a_replys_missing_objects_sooner_on_the_flower_it_was_read_from(monkeypatch):
    """server/transport.py wraps the ``pull_objects`` Flower 1.42's HttpGrid calls for a reply's objects."""
    import inspect

    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable import inflatable_utils

    from server.transport import OBJECT_RETRY, retry_objects_sooner

    source = inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert "all_object_contents = pull_objects(" in source and "initial_backoff" not in source
    assert set(OBJECT_RETRY) <= set(inspect.signature(inflatable_utils.pull_objects).parameters)
    calls = []
    monkeypatch.setattr(http_grid, "pull_objects", lambda *a, **k: calls.append(k) or {})
    assert retry_objects_sooner() and retry_objects_sooner()  # once wrapped, not wrapped again
    http_grid.pull_objects(object_ids=["a"], pull_object_fn=None)
    assert calls == [{"object_ids": ["a"], "pull_object_fn": None, **OBJECT_RETRY}]
