"""A minimal memguard daemon for the children tests.

Runs an asyncio loop with a ChildSupervisor, spawns two workers (each forks
a child of its own), prints one JSON line on stdout::

    {"daemon": pid, "sentinel": pid, "workers": [pid, pid], "children": [pid, pid]}

and then waits forever (the test kills it with SIGKILL).

With ``--restart-sentinel`` it first kills its sentinel and waits for the
supervisor to start a new one, so the JSON names the restarted sentinel.
"""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from memguard.act.children import ChildSupervisor

FORKER = Path(__file__).with_name("child_forker.py")


async def main(restart_sentinel: bool) -> None:
    children: dict[str, int] = {}
    changed = asyncio.Event()

    def on_output(worker: str, stream: str, line: str) -> None:
        if stream == "stdout" and line.strip().isdigit():
            children[worker] = int(line)
            changed.set()

    sup = ChildSupervisor(lambda event: None, on_output)
    await sup.start()
    workers = {
        name: sup.spawn(name, 1, [sys.executable, "-I", str(FORKER)], dict(os.environ), None, None, None, None)
        for name in ("a", "b")
    }

    async def both_children() -> None:
        while len(children) < 2:
            changed.clear()
            await changed.wait()

    await asyncio.wait_for(both_children(), 10)
    if restart_sentinel:
        old = sup.sentinel_pid
        assert old is not None
        os.kill(old, signal.SIGKILL)

        async def restarted() -> None:
            while sup.sentinel_pid in (None, old):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(restarted(), 10)
    print(
        json.dumps(
            {
                "daemon": os.getpid(),
                "sentinel": sup.sentinel_pid,
                "workers": sorted(workers.values()),
                "children": sorted(children.values()),
            }
        ),
        flush=True,
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main("--restart-sentinel" in sys.argv[1:]))
