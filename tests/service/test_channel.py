"""The engine-thread → greenlet crossing: events from real OS threads reach the right greenlet, in order."""
from __future__ import annotations

import threading

import gevent

from models.api import Finished, TextDelta
from service.channel import Bridge


def test_events_from_an_os_thread_arrive_in_order():
    bridge = Bridge()
    channel = bridge.channel()
    sent = [TextDelta(str(i), i + 1) for i in range(500)] + [Finished("stop", 1, 500)]

    def engine():
        for event in sent:
            channel.put(event)

    thread = threading.Thread(target=engine)
    thread.start()
    received = []
    while not received or not isinstance(received[-1], Finished):
        event = channel.get(timeout=10)
        assert event is not None, "an event was lost"
        received.append(event)
    thread.join()
    assert received == sent
    bridge.close()


def test_each_greenlet_gets_only_its_own_channel():
    bridge = Bridge()
    channels = [bridge.channel() for _ in range(8)]

    def reader(index):
        return [channels[index].get(timeout=10) for _ in range(3)]

    readers = [gevent.spawn(reader, i) for i in range(8)]

    def engine():  # interleaved, as a batched decode step produces them
        for step in range(3):
            for index, channel in enumerate(channels):
                channel.put(TextDelta(f"{index}:{step}", step + 1))

    thread = threading.Thread(target=engine)
    thread.start()
    gevent.joinall(readers, raise_error=True)
    thread.join()
    for index, greenlet in enumerate(readers):
        assert [e.text for e in greenlet.value] == [f"{index}:{step}" for step in range(3)]
    bridge.close()


def test_get_returns_none_after_its_timeout():
    bridge = Bridge()
    assert bridge.channel().get(timeout=0.01) is None
    assert bridge.channel().get(timeout=-1) is None  # a deadline already passed: no wait, no error
    bridge.close()
