"""Drives a Tern Redis endpoint with redis-py over RESP2 and RESP3. Usage: redis_py_check.py PORT PREFIX.
Exits non-zero (with the assertion) on the first difference from Redis behaviour."""
import sys
import time

import redis

port, prefix = int(sys.argv[1]), sys.argv[2]


def check(protocol):
    r = redis.Redis(host="127.0.0.1", port=port, protocol=protocol, decode_responses=True)
    p = f"{prefix}:{protocol}:"
    assert r.ping()
    # Strings and options.
    assert r.set(p + "s", "v1")
    assert r.get(p + "s") == "v1"
    assert r.set(p + "s", "v2", nx=True) is None
    assert r.set(p + "s", "v3", xx=True, get=True) == "v1"
    assert r.getset(p + "s", "v4") == "v3"
    assert r.get(p + "s") == "v4"
    assert r.set(p + "t", "x", ex=100)
    assert 98 <= r.ttl(p + "t") <= 100
    assert r.pexpire(p + "t", 50_000) and 49_000 <= r.pttl(p + "t") <= 50_000
    assert r.persist(p + "t") and r.ttl(p + "t") == -1
    assert r.set(p + "gone", "x", px=200)
    time.sleep(0.5)
    assert r.get(p + "gone") is None and r.ttl(p + "gone") == -2
    assert r.incr(p + "n") == 1 and r.incrby(p + "n", 41) == 42 and r.decr(p + "n") == 41
    assert abs(r.incrbyfloat(p + "n", 0.5) - 41.5) < 1e-9
    assert r.append(p + "a", "ab") == 2 and r.append(p + "a", "cd") == 4 and r.strlen(p + "a") == 4
    assert r.getdel(p + "a") == "abcd" and r.exists(p + "a") == 0
    assert r.mset({p + "m1": "1", p + "m2": "2"})
    assert r.mget([p + "m1", p + "m2", p + "m3"]) == ["1", "2", None]
    assert r.setnx(p + "m1", "x") is False
    assert r.type(p + "m1") == "string"
    # Hashes.
    assert r.hset(p + "h", mapping={"f1": "a", "f2": "b"}) == 2
    assert r.hset(p + "h", "f1", "c") == 0
    assert r.hget(p + "h", "f1") == "c" and r.hget(p + "h", "zz") is None
    assert r.hmget(p + "h", ["f1", "f2", "f3"]) == ["c", "b", None]
    assert r.hgetall(p + "h") == {"f1": "c", "f2": "b"}
    assert sorted(r.hkeys(p + "h")) == ["f1", "f2"] and r.hlen(p + "h") == 2
    assert r.hincrby(p + "h", "cnt", 5) == 5
    assert not r.hsetnx(p + "h", "cnt", "9") and r.hsetnx(p + "h", "new", "1")
    assert r.hdel(p + "h", "new") == 1
    assert r.hexists(p + "h", "f2") and r.hdel(p + "h", "f2", "nope") == 1
    assert r.type(p + "h") == "hash"
    fields = dict(r.hscan_iter(p + "h", count=1))
    assert fields == {"f1": "c", "cnt": "5"}, fields
    # Errors follow Redis.
    for call, message in [
        (lambda: r.get(p + "h"), "WRONGTYPE"),
        (lambda: r.hget(p + "m1", "f"), "WRONGTYPE"),
        (lambda: r.incr(p + "s"), "value is not an integer or out of range"),
        (lambda: r.execute_command("SET", p + "s", "v", "BOGUS"), "syntax error"),
        (lambda: r.execute_command("NOSUCHCMD", "a"), "unknown command"),
        (lambda: r.execute_command("GET"), "wrong number of arguments"),
    ]:
        try:
            call()
        except redis.ResponseError as e:
            assert message in str(e), (message, str(e))
        else:
            raise AssertionError(f"expected an error containing {message!r}")
    # Pipelining: replies come back in order.
    pipe = r.pipeline(transaction=False)
    for i in range(200):
        pipe.set(f"{p}pipe{i}", i)
    for i in range(200):
        pipe.get(f"{p}pipe{i}")
    replies = pipe.execute()
    assert replies[:200] == [True] * 200 and replies[200:] == [str(i) for i in range(200)]
    # SCAN finds every key (cursors are numbers to redis-py).
    found = set(r.scan_iter(match=p + "pipe*", count=50))
    assert found == {f"{p}pipe{i}" for i in range(200)}, len(found)
    assert r.delete(*found) == 200
    assert r.dbsize() >= 1
    info = r.info()
    assert "redis_version" in info and "connected_clients" in info
    r.close()


for protocol in (2, 3):
    check(protocol)
print("redis-py ok")
