"""What the rest of the simulator knows about one deployed service: where it runs and
where its pieces live in the guest. Faults, the verifier, reports and the runbook all
address services through this, never through the spec directly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceTarget:
    system: str                      # e.g. "boutique"
    service: str                     # e.g. "cartservice"
    kind: str                        # "http" (our runtime) or "redis" (a datastore)
    node: int                        # index of the sandbox node it runs on
    host: str                        # that node's IP
    port: int                        # where it listens
    unit: str                        # systemd unit, "remed-<service>.service"
    config_path: str                 # "/etc/remed/<service>.yaml" (redis: its redis.conf)
    data_dir: str                    # "/var/lib/remed/<service>"
    dependencies: tuple[str, ...]    # services it calls (redis included)
    dependents: tuple[str, ...]      # services that call it
    health_path: str = "/health"     # "" for redis (PING instead)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
