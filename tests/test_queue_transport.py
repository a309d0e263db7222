"""The queue's Redis transport (service/queue.py): kombu's, with one client per channel for
publishing. Messages sent through it arrive, in order, on the real (private) Redis, and the
client is built once, not once per message."""

from __future__ import annotations

import json

import redis
from layertrack.service import queue
from layertrack.service.settings import Settings


def test_a_redis_broker_publishes_through_one_client_and_every_message_arrives(redis_url, tmp_path):
    app = queue.make_app(Settings(broker_url=redis_url, data_dir=str(tmp_path)))
    assert app.conf.broker_transport == "layertrack.service.queue:RedisTransport"
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, queue._RedisChannel)
        with app.producer_or_acquire() as producer:
            for i in range(5):
                app.send_task(queue.SCORE_TASK, args=[f"job-{i}"], queue=queue.GPU_QUEUE, retry=False,
                              producer=producer)
        clients = set()
        for _ in range(3):
            with channel.conn_or_acquire() as client:
                clients.add(id(client))
        assert len(clients) == 1
    r = redis.Redis.from_url(redis_url)
    bodies = [json.loads(m) for m in r.lrange(queue.GPU_QUEUE, 0, -1)]
    assert [b["headers"]["argsrepr"] for b in reversed(bodies)] == [f"['job-{i}']" for i in range(5)]
    assert {b["headers"]["task"] for b in bodies} == {queue.SCORE_TASK}


def test_other_brokers_keep_kombus_transport(tmp_path):
    app = queue.make_app(Settings(data_dir=str(tmp_path)))  # the filesystem broker under the data directory
    assert app.conf.broker_transport is None
