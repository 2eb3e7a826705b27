#!/usr/bin/env python3
"""Creates N users through the gateway, then times the first page of GET /api/users and walks
every page through the Link headers (each user must come exactly once).

    host/benches/list_pages.py [N=30000] [BASE=http://127.0.0.1:3000]
"""
import concurrent.futures
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30000
BASE = urllib.parse.urlsplit(sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:3000")
local = threading.local()


def request(method, path, body=None):
    if not hasattr(local, "conn"):
        local.conn = http.client.HTTPConnection(BASE.hostname, BASE.port)
    headers = {"content-type": "application/json"} if body else {}
    local.conn.request(method, path, body=body, headers=headers)
    r = local.conn.getresponse()
    return r.status, r.getheader("link"), r.read()


def create(i):
    long_name = f"User {i} " + "x" * 80
    body = json.dumps({"name": long_name[:100], "email": f"list{i}-{time.time_ns()}@ex.com"})
    status, _, out = request("POST", "/api/users", body)
    assert status == 201, (status, out)


start = time.time()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    list(pool.map(create, range(N)))
print(f"created {N} users in {time.time() - start:.1f} s")

times = []
for _ in range(50):
    t = time.perf_counter()
    status, link, body = request("GET", "/api/users")
    times.append((time.perf_counter() - t) * 1000)
    assert status == 200 and len(json.loads(body)) == 100
print(f"GET /api/users (100 of them): median {statistics.median(times):.2f} ms, max {max(times):.2f} ms")

seen, pages, path = set(), 0, "/api/users?limit=1000"
t = time.perf_counter()
while path:
    status, link, body = request("GET", path)
    assert status == 200, (path, body)
    for user in json.loads(body):
        assert user["id"] not in seen, f"user {user['id']} twice"
        seen.add(user["id"])
    pages += 1
    path = link[1:link.index(">")] if link else None
print(f"walked {pages} pages of 1000 in {time.perf_counter() - t:.2f} s: {len(seen)} users, each once")
