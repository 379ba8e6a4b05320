"""Flower's message floor: a ClientApp that echoes its payload, a ServerApp that times round trips.

Nothing here imports torch or graftfl's protocols: what a round costs is Flower's own path
(SuperNode polling, SuperExec, a ``flwr-clientapp`` process, the ServerApp's reply pulls).
"""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()
server_app = ServerApp()


@client_app.query("echo")
def echo(message: Message, context: Context) -> Message:
    """Reply with the payload received."""
    return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Send ``rounds`` echo messages to every node, one round after another; write each round's seconds to ``out``."""
    options = dict(item.split("=", 1) for item in str(context.run_config.get("overrides", "")).split())
    rounds, nodes, payload = int(options.get("rounds", 6)), int(options.get("nodes", 2)), int(options.get("payload", 16384))
    if options.get("prompt") == "1":  # graftfl's ServerApp setting: pull replies every 0.2 s instead of 3 s
        from graftfl.server_app.prompt_grid import PromptGrid

        grid = PromptGrid(grid)
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {nodes} SuperNodes connected")
        time.sleep(0.2)
    node_ids = sorted(grid.get_node_ids())[:nodes]
    arrays = ArrayRecord([np.zeros(payload // 4, dtype=np.float32)])
    seconds = []
    for _ in range(rounds):
        messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="query.echo") for node in node_ids]
        started = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=120))
        seconds.append(time.monotonic() - started)
        if len(replies) != nodes or any(reply.has_error() for reply in replies):
            raise RuntimeError(f"echo round failed: {[reply.error.reason for reply in replies if reply.has_error()]}")
    with open(options["out"], "w") as out:
        json.dump({"round_seconds": seconds, "nodes": nodes, "payload_bytes": payload}, out)
