#!/usr/bin/env python3
"""Slow-body clients against a running host: how much memory they make it hold, whether they
are cut off, and whether the ports keep answering meanwhile.

    python3 host/benches/slow_bodies.py PORT CLIENTS HOST_PID

Each client sends headers announcing 1,048,576 bytes, then 1,048,000 of them, then stalls.
Prints the host's RSS before and 3 s in, curl latencies on :3000-:3003, and when the last
client was closed by the host.
"""
import asyncio, subprocess, sys, time
PORT=int(sys.argv[1]); N=int(sys.argv[2]); PID=sys.argv[3]
def rss(): return int(open(f"/proc/{PID}/status").read().split("VmRSS:")[1].split()[0])//1024
async def client(i, closed):
    try:
        r,w = await asyncio.open_connection("127.0.0.1", PORT)
        w.write(b"POST /users HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n\r\n")
        chunk=b"x"*65536
        for _ in range(16):
            w.write(chunk if _<15 else chunk[:65536-576])
            await w.drain()
        await r.read()  # until closed
        closed.append(time.time())
    except Exception as e:
        closed.append(time.time())
async def main():
    base=rss(); closed=[]; t0=time.time()
    tasks=[asyncio.create_task(client(i,closed)) for i in range(N)]
    await asyncio.sleep(3)
    peak=rss()
    lat=[]
    for p in (3000,3001,3002,3003):
        s=time.time(); subprocess.run(["curl","-s","-o","/dev/null",f"localhost:{p}/"],timeout=10); lat.append(round((time.time()-s)*1000))
    await asyncio.wait(tasks, timeout=30)
    print(f"base {base} MB, with {N} slow bodies {peak} MB (+{peak-base}), curl ms {lat}, closed {len(closed)}/{N}, last close after {max(closed)-t0 if closed else -1:.1f}s")
asyncio.run(main())
