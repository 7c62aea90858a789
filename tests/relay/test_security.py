"""Locking a reflector: tokens, loopback by default, TLS."""

from __future__ import annotations

import contextlib
import json
import random
import sys

import million_testplugin
import psutil
import pytest
import trio
import trustme

import million
from helpers import Process, million_command, start_reflector
from million.wire import codec, protocol, transport
from million.wire.protocol import ErrorCode, Hello, Join
from models import Ledger


def test_a_reflector_without_a_token_refuses_to_listen_beyond_loopback(tmp_path):
    result = million_command("reflector", "--host", "0.0.0.0", "--port", "0", "--store", ":memory:")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token-file", "/nonexistent/token"], "cannot read the token file"),
        (["--certfile", "/nonexistent/cert.pem"], "cannot load the TLS certificate"),
        (["--keyfile", "/nonexistent/key.pem"], "--keyfile needs --certfile"),
    ],
)
def test_unusable_security_options_get_one_line(args, message):
    result = million_command("reflector", "--port", "0", "--store", ":memory:", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_wrong_token_gets_a_reason_and_no_session_data(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-long-enough\n")
    args = ("--host", "0.0.0.0", "--token-file", str(secret))
    process, url = await start_reflector(str(tmp_path / "store.db"), 0, *args)
    url = url.replace("0.0.0.0", "127.0.0.1")
    try:
        async with (
            million.open_client(url, token="s3cret-token-long-enough") as client,
            million.join(client, "private", Ledger) as session,
        ):
            assert session.view_id
        async with transport.connect(url) as channel:
            await channel.send(codec.encode(Hello(protocol.PROTOCOL_VERSION, "guess")))
            await channel.send(codec.encode(Join(1, "private", Ledger.model_name)))
            (error,) = codec.decode_reflector(await channel.receive())
            assert isinstance(error, protocol.Error)
            assert error.code == ErrorCode.UNAUTHORIZED
            with pytest.raises(transport.Closed) as closed, trio.fail_after(5):
                await channel.receive()  # nothing else: no sync, no event
            assert closed.value.code == transport.POLICY
            assert "missing or wrong token" in closed.value.reason
    finally:
        process.stop()


@pytest.fixture
def tls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_and_cert_chain_pem.write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    return paths


async def test_a_run_over_tls_with_a_token_gets_the_right_answer(tmp_path, tls):
    secret = tmp_path / "token"
    secret.write_text("over-tls-and-long-enough")
    tls_args = ("--certfile", str(tls["cert"]), "--keyfile", str(tls["key"]), "--token-file", str(secret))
    process, url = await start_reflector(str(tmp_path / "store.db"), 0, *tls_args)
    assert url.startswith("wss://")
    try:
        trusted = ("--reflector", url, "--cafile", str(tls["ca"]), "--token", "over-tls-and-long-enough")
        run = million_command("run", "--plugin", "demo", "--partitions", "500", "--fanout", "10", *trusted,
                              "--processes", "1", "--bots", "4", "--input", "3", "--json")  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["answer"] == 1500
        status = million_command("status", *trusted, "--json")
        assert status.returncode == 0, status.stderr
        untrusted = million_command("status", "--reflector", url, "--token", "over-tls-and-long-enough")
        assert untrusted.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        assert len(untrusted.stderr.strip().splitlines()) == 1
    finally:
        process.stop()


def fuzz_frames(rng: random.Random, count: int) -> list[bytes]:
    """Random bytes, mangled messages, messages of random fields, and some valid ones."""
    templates = [
        codec.encode(message)
        for message in (
            Join(1, f"fuzz-{rng.randrange(5)}", Ledger.model_name),
            protocol.Publish("fuzz-1", "v1", "add", 1),
            protocol.Leave("fuzz-1", "v1"),
            protocol.Summarize("fuzz-1", "v1", 3, b'{"state":"x"}'),
            protocol.Snapshot("fuzz-1", 2, b'{"model":{}}', "d"),
            protocol.Digest("fuzz-1", 2, "d"),
            protocol.StatusRequest(5, ["fuzz-1"]),
            protocol.Ping(7),
        )
    ]
    types = sorted(protocol.CLIENT_MESSAGES)
    values = [None, True, -1, 2**70, "", "x" * 300, [], {}, [1, [2]], {"a": {"b": None}}]
    frames = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.2:
            frame = rng.randbytes(rng.randrange(300))
        elif kind < 0.6:
            frame = bytearray(rng.choice(templates))
            for _ in range(rng.randrange(1, 5)):
                at = rng.randrange(len(frame) + 1)
                frame[at : at + rng.randrange(3)] = rng.randbytes(rng.randrange(3))
            frame = bytes(frame)
        elif kind < 0.85:
            fields = {
                rng.choice(["session", "view", "ref", "seq", "data", "x"]): rng.choice(values)
                for _ in range(3)
            }
            frame = json.dumps({**fields, "type": rng.choice(types)}).encode()  # big ints too
        else:
            frame = rng.choice(templates)
        frames.append(frame)
    return frames


async def fuzz(url: str, seed: int, count: int) -> int:
    """Send ``count`` fuzz frames over one connection (again after being closed); returns
    how many connections it took."""
    rng = random.Random(seed)
    frames = fuzz_frames(rng, count)
    connections = 0
    while frames:
        connections += 1
        async with transport.connect(url) as channel:
            await channel.send(codec.encode(Hello(protocol.PROTOCOL_VERSION)))
            await channel.receive()  # welcome
            async with trio.open_nursery() as nursery:

                async def drain() -> None:
                    with contextlib.suppress(transport.Closed):
                        while True:
                            await channel.receive()

                nursery.start_soon(drain)
                with contextlib.suppress(transport.Closed):
                    while frames:
                        await channel.send(frames[-1])
                        frames.pop()
                nursery.cancel_scope.cancel()
    return connections


async def test_ten_thousand_fuzz_frames_beside_a_run_leave_it_right_and_memory_bounded(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"))
    memory = psutil.Process(reflector.proc.pid)
    options = ["--option", "slow=[0]", "--option", f"marker_dir={tmp_path}"]
    run = Process(
        [sys.executable, "-m", "million", "run", "--reflector", url, "--plugin", "ordered", "--input", '"f"',
         "--partitions", "2000", "--fanout", "20", "--name", "fuzzed", "--processes", "1", "--bots", "6",
         "--json", *options]
    )  # fmt: skip
    try:
        with trio.fail_after(60):
            while not (tmp_path / "0").exists():  # noqa: ASYNC110
                await trio.sleep(0.05)  # the run is under way, held at partition 0
        baseline = memory.memory_info().rss
        async with trio.open_nursery() as nursery:
            for seed in range(5):
                nursery.start_soon(fuzz, url, seed, 2_000)
        grown = memory.memory_info().rss - baseline
        (tmp_path / "go").touch()
        result = json.loads(await run.line(""))
        assert result["answer"] == million_testplugin.expected("f", 2000, 20)
        assert grown < 64 << 20, f"the reflector grew by {grown >> 20} MiB"
        async with million.open_client(url) as client:
            stats = (await client.status())["statistics"]  # still serving
        assert stats["errors"] > 5_000  # most fuzz frames reached the decoder and were refused
    finally:
        run.stop()
        reflector.stop()


async def test_insecure_lets_a_reflector_without_a_token_listen_beyond_loopback(tmp_path):
    process, url = await start_reflector(":memory:", 0, "--host", "0.0.0.0", "--insecure")
    try:
        async with million.open_client(url.replace("0.0.0.0", "127.0.0.1")) as client:
            await client.ping()
    finally:
        process.stop()
