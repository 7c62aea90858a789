"""Two participants share one replicated counter through a reflector.

    python examples/counter.py                      # starts a reflector in this process
    python examples/counter.py ws://127.0.0.1:8765  # uses a running `million reflector`

Each participant adds to the counter; both see every addition in the same order.
"""

import sys

import attrs
import trio

import million


@attrs.define
class Counter(million.Model, name="example-counter"):
    total: int = 0
    history: list[str] = attrs.Factory(list)

    def init(self, options):
        self.subscribe("add", self.add)

    def add(self, amount):
        self.total += amount
        self.history.append(f"{self.sender}+{amount}")
        self.publish("changed", self.total)


class Adder(million.View):
    async def run(self):
        for amount in range(1, 11):
            self.publish("add", amount)
            await trio.sleep(0.01)


async def participant(url: str, label: str) -> list[str]:
    async with (
        million.open_client(url, label=label) as client,
        million.join(client, "example-counter", Counter, Adder) as session,
    ):
        await session.wait_for(lambda model: model.total == 2 * 55)
        print(f"{label}: total {session.model.total} after {session.replica.seq} events")
        return list(session.model.history)


async def main(url: str | None) -> None:
    async with million.open_reflector() as reflector:
        url = url or reflector.url
        histories = {}

        async def run(label):
            histories[label] = await participant(url, label)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "alice")
            nursery.start_soon(run, "bob")
    same = histories["alice"] == histories["bob"]
    print(f"both applied the same {len(histories['alice'])} additions in the same order: {same}")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else None)
