"""Fail when an strace log of connect(2) shows an attempt to reach anything but loopback."""

import re
import sys

ADDRESS = re.compile(r'sa_family=AF_INET6?,.*?(?:inet_addr|inet_pton\(AF_INET6?,)\s*\(?"([^"]+)"')
calls = outbound = 0
with open(sys.argv[1], encoding="utf-8", errors="replace") as log:
    for line in log:
        if "connect(" not in line:
            continue
        calls += 1
        match = ADDRESS.search(line)
        if match and not (match.group(1).startswith("127.") or match.group(1) == "::1"):
            outbound += 1
            print("outbound connection attempt:", line.strip(), file=sys.stderr)
print(f"install made {calls} connect() calls, {outbound} to a non-loopback address")
sys.exit(1 if outbound else 0)
