"""A partition the kernel makes: packets to and from one loopback port dropped (iptables).

The relay in ``netfault.py`` silences a connection in user space, so the relay's own kernel still
acknowledges every segment and answers every keepalive probe: no TCP-level defence can see that
silence. A real partition (a dropped NAT entry, a failed-over host, a pulled cable) drops packets,
and that is what TCP keepalives and ``TCP_USER_TIMEOUT`` exist to detect. ``Blackhole`` drops them:

    hole = Blackhole(relay.port)     # a relay's private port: nobody else's traffic is touched
    hole.partition()                 # every packet to or from the port dropped, both ways
    hole.heal()                      # new connections pass; those open until now stay dropped
    hole.close()                     # every rule of ours removed (also on a failed test)

Needs iptables and CAP_NET_ADMIN (root): :func:`available` says whether this machine has them.
"""

from __future__ import annotations

import shutil
import subprocess


def available() -> bool:
    """Whether iptables can be changed here (root with CAP_NET_ADMIN)."""
    if shutil.which("iptables") is None:
        return False
    probe = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, check=False)
    return probe.returncode == 0


class Blackhole:
    """Drops loopback TCP packets to and from ``port`` while partitioned (see the module)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tag = f"accumsync-chaos-{port}"
        self.rules: list[list[str]] = []
        self.dropped_flows: list[int] = []

    def _add(self, *match: str) -> list[str]:
        rule = ["INPUT", "-i", "lo", "-p", "tcp", *match, "-m", "comment", "--comment", self.tag]
        rule += ["-j", "DROP"]
        subprocess.run(["iptables", "-w", "-I", *rule], check=True)
        self.rules.append(rule)
        return rule

    def _delete(self, rule: list[str]) -> None:
        subprocess.run(["iptables", "-w", "-D", *rule], check=False, capture_output=True)
        self.rules.remove(rule)

    def partition(self) -> None:
        """Every packet to or from the port dropped, on open and new connections alike."""
        self._whole = [self._add("--dport", str(self.port)), self._add("--sport", str(self.port))]

    def open_flows(self) -> list[int]:
        """Client ports of the connections to ``port`` the kernel still holds."""
        out = subprocess.run(
            ["ss", "-Htn", f"( sport = :{self.port} )"], capture_output=True, text=True, check=True
        ).stdout
        return sorted({int(line.split()[-1].rsplit(":", 1)[1]) for line in out.splitlines()})

    def heal(self) -> None:
        """New connections pass again; the ones open during the partition stay dropped for good,
        as after a NAT entry is lost: only the client's own timeouts can end them."""
        self.dropped_flows = self.open_flows()
        for client in self.dropped_flows:
            self._add("--dport", str(self.port), "--sport", str(client))
            self._add("--sport", str(self.port), "--dport", str(client))
        for rule in self._whole:
            self._delete(rule)

    def close(self) -> None:
        for rule in list(self.rules):
            self._delete(rule)
