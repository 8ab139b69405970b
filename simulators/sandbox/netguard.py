"""Network isolation of sandboxes: a node can answer the host, never call it.

Every sandbox's nodes sit on a bridge of its own (nspawn `rmbrS`, libvirt `rmvbrS`), and
the host has an address on it. Without rules, anything a node runs (a model-written
playbook runs as root there) could open connections to every host service bound to
0.0.0.0 (Ray's dashboard, GCS and raylet ports among them), to the host's address on any
other bridge (a node can add its own routes), and onwards to other sandboxes.

One nftables table per isolated sandbox, `inet e2e_reme_<bridge>`, created with the
sandbox and deleted with it:

    input    packets that arrive on the bridge and are not replies to a connection the
             host opened (SSH, load generation, health checks) are dropped, whatever host
             address they are sent to, IPv4 or IPv6
    forward  traffic between ports of the bridge passes (node <-> node inside the
             sandbox, seen here because br_netfilter may be loaded); everything else
             arriving on the bridge, or routed into it, is dropped: no other sandbox, no
             outside world

Matching the input interface rather than addresses means a node cannot escape by
spoofing a source address or adding a route: whatever it sends reaches the host through
the bridge. A libvirt bridge additionally lets DHCP requests through (its guests get
their fixed address from libvirt's dnsmasq on the host). A sandbox made with
`reach_host=True` (lab stand-ins that join the host's Ray cluster) gets no table; other
sandboxes still cannot reach it, since their own tables drop what they send.

`sweep(live)` (part of `remed sandbox gc`) deletes the table of every bridge that no live
sandbox owns; `status()` says which tables are in force (`remed doctor`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

TABLE_PREFIX = "e2e_reme_"
_BRIDGE_OK = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class NetguardError(RuntimeError):
    """The rules could not be put in force: the sandbox must not start without them."""


@dataclass(frozen=True)
class GuardStatus:
    available: bool          # nft is installed and answers
    tables: tuple[str, ...]  # the bridges with a table in force
    reason: str = ""


def table_name(bridge: str) -> str:
    return TABLE_PREFIX + bridge.replace("-", "_").replace(".", "_")


def ruleset(bridge: str, *, dhcp: bool = False) -> str:
    """The nft script that isolates one bridge (see the module docstring)."""
    if not _BRIDGE_OK.match(bridge):
        raise ValueError(f"not an interface name: {bridge!r}")
    allow_dhcp = f'    iifname "{bridge}" udp sport 68 udp dport 67 accept\n' if dhcp else ""
    return (f"table inet {table_name(bridge)} {{\n"
            # priority -5: before the filter chains other software (libvirt, Docker) adds at 0,
            # so their accept verdicts cannot open what this table closes (a drop is final).
            f"  chain input {{\n    type filter hook input priority -5; policy accept;\n"
            f'    iifname "{bridge}" ct state established,related accept\n'
            f"{allow_dhcp}"
            f'    iifname "{bridge}" drop\n  }}\n'
            f"  chain forward {{\n    type filter hook forward priority -5; policy accept;\n"
            f'    iifname "{bridge}" oifname "{bridge}" accept\n'
            f'    iifname "{bridge}" drop\n'
            f'    oifname "{bridge}" drop\n  }}\n'
            f"}}\n")


def isolate(bridge: str, *, dhcp: bool = False) -> None:
    """Put the bridge's table in force (replacing an older one of the same name)."""
    _nft(["-f", "-"], input=f"table inet {table_name(bridge)}\ndelete table inet {table_name(bridge)}\n"
                            + ruleset(bridge, dhcp=dhcp))


def release(bridge: str | None) -> None:
    """Delete the bridge's table; nothing if there is none."""
    if bridge and bridge in tables():
        _nft(["delete", "table", "inet", table_name(bridge)], check=False)


def tables() -> dict[str, str]:
    """bridge name -> table name, for every table of ours in force."""
    if shutil.which("nft") is None:
        return {}
    r = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith(TABLE_PREFIX):
            out[_bridge_of(parts[2])] = parts[2]
    return out


def sweep(live_bridges: set[str]) -> list[str]:
    """Delete the tables of bridges that no live sandbox owns; return what was done."""
    done = []
    for bridge, table in tables().items():
        if bridge not in live_bridges:
            _nft(["delete", "table", "inet", table], check=False)
            done.append(f"nftables table {table}")
    return done


def status() -> GuardStatus:
    if shutil.which("nft") is None:
        return GuardStatus(False, (), "nft is not installed (apt-get install nftables)")
    r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    if r.returncode != 0:
        return GuardStatus(False, (), f"nft does not answer: {r.stderr.strip()[:200]}")
    return GuardStatus(True, tuple(sorted(tables())))


def _bridge_of(table: str) -> str:
    # Our bridge names hold only letters and digits, so the mapping is one to one.
    return table[len(TABLE_PREFIX):]


def _nft(args: list[str], *, input: str | None = None, check: bool = True) -> None:
    if shutil.which("nft") is None:
        raise NetguardError("nft is not installed, so sandboxes cannot be isolated from the host; "
                            "run `make setup` (apt-get install nftables)")
    r = subprocess.run(["nft", *args], input=input, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetguardError(f"nft {' '.join(args)} failed: {r.stderr.strip()[:400]}")


__all__ = ["isolate", "release", "sweep", "status", "tables", "ruleset", "table_name", "GuardStatus",
           "NetguardError"]
