"""The Ray fleet: one actor per sandbox host owning that host's sandboxes, a driver-side
`Fleet` that schedules episodes across them with back-pressure and fault tolerance, and
experience collection into append-only shards.

    from e2e_reme.cluster import Fleet, FleetConfig, HostConfig, Job, collect, CollectConfig

    with Fleet(FleetConfig()).start() as fleet:          # a local Ray; address="auto" joins a cluster
        for rec in fleet.run(jobs): ...
        records = fleet.evaluate(scenario, completions)  # G completions, one starting state
        judged = Judge(fleet)(scenarios, completions)    # one Judgement (reward, blame) each

See fleet.py (placement, scheduling, fault tolerance), host.py (the actor),
experience.py (`remed fleet collect`) and judge.py (completions judged by execution).
"""

from .errors import FleetError, HostStartFailed, NoSandboxHosts, RayUnavailable
from .experience import CollectConfig, collect, plan
from .fleet import RESOURCE, Fleet, FleetConfig
from .sandbox_host import HostConfig, Job, SandboxHost, plan_slots
from .judge import Judge, Judgement, reward_of

__all__ = ["CollectConfig", "Fleet", "FleetConfig", "FleetError", "HostConfig", "HostStartFailed", "Job", "Judge",
           "Judgement", "NoSandboxHosts", "RESOURCE", "RayUnavailable", "SandboxHost", "collect", "plan",
           "plan_slots", "reward_of"]
