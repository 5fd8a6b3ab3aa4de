"""A long-lived publisher (the node, the API) follows a change of broker instead of talking to the
broker its pooled connections were first opened for."""

from __future__ import annotations

import redis

from node.core.settings import load_settings
from node.jobs.broker import publish_delivery
from tests.jobs.conftest import RedisServer


def test_publisher_follows_a_new_broker_url(tmp_path):
    first, second = RedisServer(tmp_path), RedisServer(tmp_path)
    first.start()
    try:
        assert publish_delivery(load_settings(None, {"AINODE_BROKER__URL": first.url}), 1)
    finally:
        first.stop()
    second.start()
    try:
        assert publish_delivery(load_settings(None, {"AINODE_BROKER__URL": second.url}), 2)
        keys = redis.Redis(port=second.port).keys("*")
        assert keys, "the message went somewhere else than the configured broker"
    finally:
        second.stop()
