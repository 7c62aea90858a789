"""A participant in its own process: ``python tests/participant.py URL SESSION COUNT TARGET``.

Joins SESSION as a ``Ledger`` with target TARGET, publishes COUNT additions, prints
``joined <view>`` once joined and ``digest <seq> <digest>`` when the model reaches its
target, then stays until killed or until stdin closes.
"""

import sys

import trio

import million
from models import DigestOnTarget, Ledger


async def main(url: str, name: str, count: int, target: int) -> None:
    async with (
        million.open_client(url, label="participant") as client,
        million.join(client, name, Ledger, DigestOnTarget, {"target": target}) as session,
    ):
        print("joined", session.view_id, flush=True)
        for i in range(count):
            session.publish("add", i)
        view = session.view
        await view.reached.wait()
        print("digest", *view.digest, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


if __name__ == "__main__":
    url, name, count, target = sys.argv[1:5]
    trio.run(main, url, name, int(count), int(target))
