"""A stand-in server process for the durability tests: it owns a feature store and ingests chunks.

Reads pickled :class:`Chunk` objects from stdin, commits each and only then prints
``ack <client>/<upload> <new rows>``, as the features strategy acknowledges a chunk
only after its transaction commits. ``--die-inside <client>/<upload>`` makes the
process SIGKILL itself after that chunk's rows are written but before COMMIT.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys

from graftfl.strategies.features.store import FeatureStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--die-inside", default=None)
    args = parser.parse_args()
    store = FeatureStore(args.store)
    print("ready", flush=True)
    while True:
        try:
            chunk = pickle.load(sys.stdin.buffer)
        except EOFError:
            break
        key = f"{chunk.client_id}/{chunk.upload_id}"
        if key == args.die_inside:
            original = store._conn

            class DieBeforeCommit:  # forwards everything, but dies when asked to COMMIT
                connection = original  # bound now: the loop rebinds `original` for later chunks

                def execute(self, sql, *rest):
                    if sql == "COMMIT":
                        os.kill(os.getpid(), signal.SIGKILL)
                    return self.connection.execute(sql, *rest)

                def __getattr__(self, name):
                    return getattr(self.connection, name)

            store._conn = DieBeforeCommit()
        inserted = store.ingest_chunk(chunk)
        print(f"ack {key} {inserted}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
