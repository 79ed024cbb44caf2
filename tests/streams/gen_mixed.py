#!/usr/bin/env python3
"""Writes mixed.jsonl: one Observation (src/messages.rs, serde JSON) per line.

45 seconds of a small customer network, deterministic:
  203.0.113.7   SSH brute force on 198.51.100.22 (1 attempt/s, answered, closed)
  203.0.113.8   SYN port scan of 198.51.100.33 (200 ports/s, closed ports reset)
  203.0.113.9   spam: SMTP to 60 distinct mail servers
  203.0.113.53  DNS resolver: 25 queries/s to 400 servers, answered   (benign)
  203.0.113.80  web server: clients connect in, 200k pps out          (benign)
  192.0.2.25    mail relay (profile: spam disabled): SMTP fan-out      (benign)
  2001:db8:1:5::/64 telnet sweep from many addresses of one /64
Ticks every 250 ms. Re-run after changing it: python3 gen_mixed.py > mixed.jsonl
"""
import json

T0 = 1_800_000_000 * 10**9
MS = 10**6
SEEN_REPLY, ASSURED = 2, 4
out = []

def flow(ms, kind, src, dst, proto, sport, dport, status=0, state=None):
    # Absent optional fields read as None.
    o = {"type": "flow", "time": T0 + ms * MS, "kind": kind, "src": src, "dst": dst,
         "proto": proto, "sport": sport, "dport": dport, "status": status}
    if state is not None:
        o["tcp_state"] = state
    out.append((ms, o))

def answered_tcp(ms, src, dst, sport, dport, close_after=None):
    flow(ms, "new", src, dst, 6, sport, dport, 0, "syn_sent")
    flow(ms + 1, "update", src, dst, 6, sport, dport, SEEN_REPLY, "syn_recv")
    flow(ms + 2, "update", src, dst, 6, sport, dport, SEEN_REPLY | ASSURED, "established")
    if close_after is not None:
        flow(ms + close_after, "update", src, dst, 6, sport, dport, SEEN_REPLY | ASSURED, "time_wait")

def inet(i):
    a = 0x0a000000 | ((i * 2654435761) & 0x00ffffff)
    return ".".join(str((a >> s) & 255) for s in (24, 16, 8, 0))

# brute force: 1 attempt/s for 40 s
for i in range(40):
    answered_tcp(i * 1000 + 100, "203.0.113.7", "198.51.100.22", 40000 + i, 22, close_after=800)

# port scan: 200 ports/s from 10 s, 300 ports
for p in range(1, 301):
    ms = 10_000 + p * 5
    flow(ms, "new", "203.0.113.8", "198.51.100.33", 6, 61000, p, 0, "syn_sent")
    if p in (22, 80, 443):
        flow(ms + 1, "update", "203.0.113.8", "198.51.100.33", 6, 61000, p, SEEN_REPLY, "syn_recv")
    else:
        flow(ms + 1, "update", "203.0.113.8", "198.51.100.33", 6, 61000, p, SEEN_REPLY, "close")

# spam: one new mail server every 500 ms
for i in range(60):
    answered_tcp(i * 500 + 50, "203.0.113.9", inet(100_000 + i), 45000 + i, 25, close_after=300)

# resolver: 25 queries/s for 40 s to 400 servers, answered
for i in range(1000):
    ms = i * 40
    dst = inet(200_000 + i % 400)
    sport = 1024 + i
    flow(ms, "new", "203.0.113.53", dst, 17, sport, 53)
    flow(ms + 15, "update", "203.0.113.53", dst, 17, sport, 53, SEEN_REPLY)

# web server: clients in, counters out
for i in range(500):
    ms = i * 80
    flow(ms, "new", inet(300_000 + i), "203.0.113.80", 6, 30000 + i, 443, 0, "syn_sent")
for s in range(1, 41):
    out.append((s * 1000, {"type": "counters", "time": T0 + s * 1000 * MS, "addr": "203.0.113.80",
                           "packets": 200_000, "bytes": 250_000_000, "interval_ns": 10**9}))

# mail relay: 100 mail servers in 30 s
for i in range(100):
    answered_tcp(i * 300 + 30, "192.0.2.25", inet(400_000 + i), 20000 + i, 25, close_after=200)

# IPv6 telnet sweep from one /64, 50 probes/s from 20 s
for i in range(600):
    src = "2001:db8:1:5::%x" % (i % 97 + 1)
    dst = "2001:db8:ffff::%x" % (i + 1)
    flow(20_000 + i * 20, "new", src, dst, 6, 50000, 23, 0, "syn_sent")

# ticks every 250 ms up to 45 s
for t in range(0, 45_001, 250):
    out.append((t, {"type": "tick", "time": T0 + t * MS}))

out.sort(key=lambda x: x[0])
for _, o in out:
    print(json.dumps(o, separators=(",", ":")))
