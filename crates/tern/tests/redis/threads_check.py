"""Checks a proxy that serves connections on several threads, through redis-py connections held
open at once (the proxy hands each new connection to the thread serving the fewest, so the three
connections below land on three threads). Usage: threads_check.py PORT"""
import sys

import redis

port = int(sys.argv[1])
conns = [redis.Redis(host="127.0.0.1", port=port, single_connection_client=True, decode_responses=True) for _ in range(3)]
for c in conns:
    c.ping()

# Each connection writes its own keys; every connection reads all of them.
for i in range(60):
    conns[i % 3].set(f"t:{i}", f"v{i}")
for c in conns:
    assert c.mget([f"t:{i}" for i in range(60)]) == [f"v{i}" for i in range(60)]

# A SCAN started on one connection continues on the others (a connection pool does this).
seen, cursor, turn = set(), 0, 0
while True:
    cursor, keys = conns[turn % 3].scan(cursor=cursor, match="t:*", count=7)
    seen.update(keys)
    turn += 1
    if cursor == 0:
        break
assert seen == {f"t:{i}" for i in range(60)}, sorted(seen)
assert turn >= 3, f"the scan took {turn} pages: it never crossed connections"

# Counters are the proxy's, not one thread's.
clients = conns[0].info("clients")["connected_clients"]
assert clients == 3, clients
print("threads ok")
