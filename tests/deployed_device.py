"""
A stand-in for a LEELOO device in the field, as its own process (so that a
test can freeze it with SIGSTOP or kill it with SIGKILL).

It does what the deployed ``leeloo_client.py`` does, with its library: the
``websockets`` package's asyncio client with its default settings (which
answers the relay's pings by itself), ``join_crew`` with its saved code and
``create_crew`` with it when the join is refused; it never sends ``ack`` or
``last_seq``.  Every frame it receives is written to stdout as one line, and
its end as ``{"type": "_closed", "code": CODE}``.

    python -m tests.deployed_device URL DEVICE_ID CREW_CODE NAME
"""

import asyncio
import json
import sys

import websockets


def say(frame):
    sys.stdout.write(frame if isinstance(frame, str) else frame.decode("utf-8"))
    sys.stdout.write("\n")
    sys.stdout.flush()


async def main(url, device_id, crew_code, name):
    ws = await websockets.connect(url)
    code = None
    try:
        await ws.send(json.dumps({"type": "join_crew", "crew_code": crew_code, "device_id": device_id,
                                  "display_name": name}))
        reply = await ws.recv()
        say(reply)
        if json.loads(reply).get("type") == "error":
            await ws.send(json.dumps({"type": "create_crew", "device_id": device_id, "display_name": name,
                                      "crew_code": crew_code}))
        async for frame in ws:
            say(frame)
    except websockets.ConnectionClosed:
        pass
    finally:
        if ws.close_code is not None:
            code = ws.close_code
        say(json.dumps({"type": "_closed", "code": code}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
