"""Network faults: delay and loss on the service's traffic (MicroRemed's two) and a firewall
rule dropping a dependency's traffic. (No wrong-/etc/hosts fault: the deployments write
dependency addresses as IPs, so name resolution plays no part in reaching them.)

"The service's traffic" is what leaves its node on its behalf: its replies (source port =
its port) and its requests to its dependencies (destination = their address), on the
node's interface and on loopback (services on one node talk over lo). Both mechanisms
act on egress only, as MicroRemed's netem does:

- netem (tc): a prio qdisc whose fourth band holds the netem, and u32 filters steering
  the service's packets into it. Needs a kernel with netem: libvirt guests have it; an
  nspawn container shares the host's kernel, which here has none.
- nftables: an output-hook rule `... numgen random mod 100 < P drop` (loss, where netem
  is missing) or a plain `drop` (firewall-drop).
"""

from __future__ import annotations

import shlex

from e2e_reme.simulators.errors import FaultError, FaultUnavailable
from e2e_reme.simulators.faults.base import needs_met, register_fault
from e2e_reme.simulators.faults.resource import _Observed


def _iface_script(host: str) -> str:
    """The name of the interface holding `host` (the service's address) on its node."""
    return (f"ip -o -4 addr show | awk -v a={shlex.quote(host)} "
            "'{split($4, p, \"/\"); if (p[1] == a) print $2}' | head -1")


def _table(prefix: str, service: str) -> str:
    return f"{prefix}_{service.replace('-', '_')}"


class _DependencyMixin:
    """Faults that act on one of the service's dependencies (chosen by seed unless given)."""

    @classmethod
    def applies_to(cls, target, targets=None) -> tuple[bool, str]:
        ok, why = super().applies_to(target, targets)
        if ok and not target.dependencies:
            return False, f"{cls.name}: {target.service} has no dependencies to act on"
        return ok, why

    def _dependency(self) -> str:
        deps = [d for d in self.target.dependencies if d in self.targets]
        if not deps:
            raise FaultUnavailable(f"{self.name}: {self.target.service} has no dependencies "
                                   f"(with a known address) to act on")
        want = self.params.get("dependency") or ""
        if want:
            if want not in deps:
                raise FaultUnavailable(f"{self.name}: '{want}' is not a dependency of {self.target.service} "
                                       f"(its dependencies: {', '.join(deps)})")
            return want
        return self.rng.choice(sorted(deps))

    def _check(self, sb) -> None:
        self.params["dependency"] = self._dependency()


class _Netem(_Observed):
    """A netem qdisc on the service's egress (interface and loopback)."""
    sections = ("unit", "health", "latency", "metrics", "network", "journal")

    def _netem_args(self) -> str:
        raise NotImplementedError

    def _inject_netem(self, sb) -> None:
        if self._netem_active(sb):
            # One root qdisc per interface: a second netem would silently replace the first.
            raise FaultUnavailable(f"{self.name}: a netem qdisc is already on {self.target.service}'s interfaces")
        t = self.target
        filters = [f"match ip sport {t.port} 0xffff"]
        for d in t.dependencies:
            dt = self.targets.get(d)
            if dt is not None:
                filters.append(f"match ip dst {dt.host}/32 match ip dport {dt.port} 0xffff")
        lines = ["set -e", f"dev=$({_iface_script(t.host)})",
                 f"[ -n \"$dev\" ] || {{ echo 'no interface holds {t.host}' >&2; exit 3; }}",
                 "for d in $dev lo; do",
                 "  tc qdisc del dev $d root 2>/dev/null || true",
                 "  tc qdisc add dev $d root handle 1: prio bands 4 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1",
                 f"  tc qdisc add dev $d parent 1:4 handle 40: netem {self._netem_args()}"]
        lines += [f"  tc filter add dev $d parent 1: protocol ip prio 1 u32 {f} flowid 1:4" for f in filters]
        lines += ["done"]
        self.sh(sb, "\n".join(lines))

    def _netem_active(self, sb) -> bool:
        res = self.sh(sb, f"dev=$({_iface_script(self.target.host)}); "
                          "for d in $dev lo; do tc qdisc show dev $d; done", check=False)
        return " netem " in f" {res.stdout} "

    def _recover_netem(self, sb) -> None:
        self.sh(sb, f"dev=$({_iface_script(self.target.host)}); "
                    "for d in $dev lo; do tc qdisc show dev $d | grep -q ' netem ' && "
                    "tc qdisc del dev $d root; done; true", check=False)


@register_fault("network-delay")
class NetworkDelay(_Netem):
    category = "network"
    needs = ("netem",)
    summary = "1000 ms delay on the service's traffic (tc netem; MicroRemed: network delay)"
    defaults = {"delay_ms": 1000, "jitter_ms": 0}

    def _netem_args(self) -> str:
        j = int(self.params["jitter_ms"])
        return f"delay {int(self.params['delay_ms'])}ms" + (f" {j}ms" if j else "")

    def _inject(self, sb) -> None:
        self._inject_netem(sb)

    def is_active(self, sb) -> bool:
        return self._netem_active(sb)

    def _recover(self, sb) -> None:
        self._recover_netem(sb)


@register_fault("network-loss")
class NetworkLoss(_Netem):
    category = "network"
    needs = ("netem|nftables",)
    summary = "50 % packet loss on the service's traffic (netem where the kernel has it, else nftables numgen)"
    defaults = {"loss_pct": 50, "mechanism": "auto"}

    def _netem_args(self) -> str:
        return f"loss {int(self.params['loss_pct'])}%"

    @property
    def _nft_table(self) -> str:
        return _table("netpolicy", self.target.service)

    def _check(self, sb) -> None:
        mech = self.params["mechanism"]
        if mech == "auto":
            # netem where the kernel has it and no other netem (a delay) holds the interface.
            mech = ("netem" if needs_met(("netem",), sb.backend, self._report)[0] and not self._netem_active(sb)
                    else "nftables")
        if mech not in ("netem", "nftables"):
            raise FaultError(f"network-loss: mechanism '{mech}' is not netem, nftables or auto")
        ok, why = needs_met((mech,), sb.backend, self._report)
        if not ok:
            raise FaultUnavailable(f"network-loss with {mech}: {why}")
        self.params["mechanism"] = mech

    def _inject(self, sb) -> None:
        if self.params["mechanism"] == "netem":
            return self._inject_netem(sb)
        t, p = self.target, int(self.params["loss_pct"])
        rules = [f"tcp sport {t.port} numgen random mod 100 < {p} drop"]
        for d in t.dependencies:
            dt = self.targets.get(d)
            if dt is not None:
                rules.append(f"ip daddr {dt.host} tcp dport {dt.port} numgen random mod 100 < {p} drop")
        ruleset = (f"table inet {self._nft_table} {{\n  chain output {{\n"
                   "    type filter hook output priority 0; policy accept;\n"
                   + "".join(f"    {r}\n" for r in rules) + "  }\n}\n")
        self.sh(sb, f"nft delete table inet {self._nft_table} 2>/dev/null; nft -f -", input=ruleset)

    def is_active(self, sb) -> bool:
        if self.params["mechanism"] == "netem":
            return self._netem_active(sb)
        # Any rule, in our table or one it was copied or renamed into, that still drops the
        # service's traffic at random: the fault is what the rule does, not its table's name.
        res = self.sh(sb, "nft list ruleset 2>/dev/null", check=False)
        t = self.target
        marks = [f"sport {t.port} "] + [f"ip daddr {self.targets[d].host} " for d in t.dependencies
                                         if d in self.targets]
        return any("numgen random" in line and line.strip().endswith("drop") and any(m in line + " " for m in marks)
                   for line in res.stdout.splitlines())

    def _recover(self, sb) -> None:
        if self.params["mechanism"] == "netem":
            return self._recover_netem(sb)
        self.sh(sb, f"nft delete table inet {self._nft_table} 2>/dev/null; true", check=False)


@register_fault("firewall-drop")
class FirewallDrop(_DependencyMixin, _Observed):
    category = "network"
    needs = ("nftables",)
    summary = "an nftables rule silently drops the service's traffic to one of its dependencies"
    defaults = {"dependency": ""}
    sections = ("unit", "health", "latency", "metrics", "network", "journal")

    @property
    def _nft_table(self) -> str:
        return _table("egress", self.target.service)

    def _inject(self, sb) -> None:
        dt = self.targets[self.params["dependency"]]
        ruleset = (f"table inet {self._nft_table} {{\n  chain output {{\n"
                   "    type filter hook output priority 0; policy accept;\n"
                   f"    ip daddr {dt.host} tcp dport {dt.port} drop\n  }}\n}}\n")
        self.sh(sb, f"nft delete table inet {self._nft_table} 2>/dev/null; nft -f -", input=ruleset)

    def is_active(self, sb) -> bool:
        dt = self.targets.get(self.params["dependency"])
        res = self.sh(sb, "nft list ruleset 2>/dev/null", check=False)
        # Any rule, ours or one copied elsewhere, that still drops this traffic.
        return any(f"ip daddr {dt.host}" in line and f"dport {dt.port}" in line and line.strip().endswith("drop")
                   for line in res.stdout.splitlines())

    def _recover(self, sb) -> None:
        self.sh(sb, f"nft delete table inet {self._nft_table} 2>/dev/null; true", check=False)
