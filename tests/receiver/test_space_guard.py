"""store.SpaceGuard: asks the filesystem rarely far from the reserve, every time near it."""

from __future__ import annotations

import pytest

from node.ingest import store


def test_guard_refuses_exactly_like_ensure_space_near_the_reserve(tmp_path, monkeypatch):
    free = {"bytes": 10_000}
    calls = []

    def fake_free(root):
        calls.append(root)
        return free["bytes"]

    monkeypatch.setattr(store, "free_bytes", fake_free)
    guard = store.SpaceGuard(tmp_path, reserve=1_000, margin=5_000, max_age=3600)
    guard.check(100)
    guard.check(100)
    assert len(calls) == 1  # far from the reserve: the cached figure serves
    free["bytes"] = 5_900  # within the margin: every check asks again
    guard._free = 10_000
    guard.check(4_100)  # 10_000 - 4_100 is within the margin: asks, 5_900 - 4_100 >= 1_000
    with pytest.raises(store.OutOfSpace):
        guard.check(5_000)  # 5_900 - 5_000 < 1_000
    assert len(calls) == 3


def test_guard_refreshes_an_old_figure(tmp_path, monkeypatch):
    free = {"bytes": 10**12}
    monkeypatch.setattr(store, "free_bytes", lambda root: free["bytes"])
    guard = store.SpaceGuard(tmp_path, reserve=10**9, max_age=0.0)
    guard.check()
    free["bytes"] = 10
    with pytest.raises(store.OutOfSpace):
        guard.check()
