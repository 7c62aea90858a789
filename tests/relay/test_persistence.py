"""The store: a reflector killed with SIGKILL comes back with every event it relayed."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
import trio

import million
from helpers import start_reflector
from million.relay import store as store_module
from million.relay.config import ReflectorConfig
from million.relay.store import MAGIC, Batch, StoreError, open_store
from models import Ledger


async def test_a_killed_reflector_restarts_with_every_relayed_event(tmp_path):
    store = str(tmp_path / "store.db")
    process, url = await start_reflector(store, 0, "--snapshot-every", "100")
    port = url.rsplit(":", 1)[1]
    try:
        async with million.open_client(url) as client, million.join(client, "durable", Ledger) as session:
            for i in range(250):
                session.publish("add", i)
            with trio.fail_after(10):
                await session.wait_for(lambda model: model.total == 250)
            seen = [value for value, *_ in session.model.entries]
            process.kill()
            process, _ = await start_reflector(store, int(port))
            with trio.fail_after(20):
                while not (client.connected and session.synced):
                    await session.wait_changed()
            assert session.resyncs == 1
            assert [value for value, *_ in session.model.entries] == seen
            for i in range(250, 300):
                session.publish("add", i)
            with trio.fail_after(10):
                await session.wait_for(lambda model: model.total == 300)
        async with million.open_client(url) as late, million.join(late, "durable", Ledger) as rejoined:
            assert [value for value, *_ in rejoined.model.entries] == list(range(300))
            kinds = [kind for kind, *_ in rejoined.model.presence]
            # the first membership exited when the reflector died; the resync joined anew
            assert kinds == ["join", "exit", "join", "exit", "join"]
            assert rejoined.model.present == [rejoined.view_id]
    finally:
        process.stop()


async def test_the_store_keeps_the_latest_snapshot_and_only_the_events_after_it(tmp_path):
    path = str(tmp_path / "store.db")
    store = open_store(path)
    await store.commit(
        Batch(
            created=[("s", "m", b'{"a":1}')],
            events=[("s", seq, b'{"seq":%d}' % seq) for seq in range(1, 6)],
        )
    )
    await store.commit(Batch(snapshots=[("s", 3, 30, b'{"state":3}', "d3")]))
    await store.commit(Batch(snapshots=[("s", 2, 20, b'{"state":2}', "d2")]))  # older: ignored
    store.close()
    reopened = open_store(path)
    stored = await reopened.load("s")
    reopened.close()
    assert stored is not None
    assert (stored.snapshot_seq, stored.snapshot_time, stored.snapshot_state) == (3, 30, b'{"state":3}')
    assert stored.events == [b'{"seq":4}', b'{"seq":5}']
    assert stored.options == b'{"a":1}'


async def test_idle_sessions_beyond_the_limit_leave_memory_and_come_back_whole(tmp_path):
    config = ReflectorConfig(port=0, store=str(tmp_path / "store.db"), idle_sessions=2)
    async with million.open_reflector(config) as reflector, million.open_client(reflector.url) as client:
        for name in ("a", "b", "c"):
            async with million.join(client, name, Ledger) as session:
                session.publish("add", name)
                await session.wait_for(lambda model: model.total == 1)
            await client.settle()
        with trio.fail_after(10):
            while reflector.statistics().idle != 2 or await reflector.store.load("a") is None:  # noqa: ASYNC110
                await trio.sleep(0.01)  # eviction follows the leaving snapshot: poll for it
        for name in ("a", "b", "c"):  # "a" from the store, the others from memory
            async with million.join(client, name, Ledger) as session:
                assert [value for value, *_ in session.model.entries] == [name]
                assert [kind for kind, *_ in session.model.presence] == ["join", "exit", "join"]
        await client.settle()
        with trio.fail_after(10):
            while reflector.statistics().idle != 2:  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_a_journal_cut_short_by_a_kill_is_applied_up_to_its_last_whole_batch(tmp_path):
    store = open_store(str(tmp_path / "first.db"))
    await store.commit(Batch(created=[("s", "m", b"{}")], events=[("s", 1, b'{"seq":1}')]))
    await store.commit(Batch(events=[("s", 2, b'{"seq":2}')]))
    journal = (tmp_path / "first.db.journal").read_bytes()
    store.close()
    (tmp_path / "second.db.journal").write_bytes(journal[:-3])  # the kill came mid-write
    recovered = open_store(str(tmp_path / "second.db"))
    try:
        stored = await recovered.load("s")
        assert stored is not None
        assert stored.events == [b'{"seq":1}']
    finally:
        recovered.close()
    assert not (tmp_path / "second.db.journal").exists()


async def test_batches_survive_an_apply_that_sqlite_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.01)
    path = str(tmp_path / "store.db")
    store = open_store(path)
    try:
        await store.commit(Batch(created=[("s", "m", b"{}")], events=[("s", 1, b'{"seq":1}')]))
        with contextlib.closing(sqlite3.connect(path)) as blocker:
            blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file
            with pytest.raises(StoreError, match="database is locked"):
                await store.apply()
            await store.commit(Batch(events=[("s", 2, b'{"seq":2}')]))
            blocker.rollback()
        stored = await store.load("s")
        assert stored is not None
        assert stored.events == [b'{"seq":1}', b'{"seq":2}']
    finally:
        store.close()
    assert not list(tmp_path.glob("store.db.journal*"))


async def test_a_kill_during_an_apply_leaves_two_journals_and_both_are_applied(tmp_path):
    store = open_store(str(tmp_path / "first.db"))
    await store.commit(Batch(created=[("s", "m", b"{}")], events=[("s", 1, b'{"seq":1}')]))
    older = (tmp_path / "first.db.journal").read_bytes()
    await store.commit(Batch(events=[("s", 2, b'{"seq":2}')]))
    newer = MAGIC + (tmp_path / "first.db.journal").read_bytes()[len(older) :]  # as a new journal begins
    store.close()
    (tmp_path / "second.db.journal-applying").write_bytes(older)
    (tmp_path / "second.db.journal").write_bytes(newer)
    recovered = open_store(str(tmp_path / "second.db"))
    try:
        stored = await recovered.load("s")
        assert stored is not None
        assert stored.events == [b'{"seq":1}', b'{"seq":2}']
    finally:
        recovered.close()
    assert not list(tmp_path.glob("second.db.journal*"))
