"""The fault catalog: real failures injected into a deployed service, which stay until
something fixes them.

    from e2e_reme.simulators.faults import make_fault, injected_faults

    f = make_fault("cpu-stress", deployment.targets["hello-service"], deployment.targets, seed=7)
    f.inject(sb)              # FaultUnavailable (with the reason) where it cannot run
    f.is_active(sb)           # ground truth, read from the sandbox
    f.describe(sb)            # what monitoring observes: for diagnosis reports
    f.recover(sb)             # the harness's own undo (cleanup)
    injected_faults(sb)       # the faults recorded for this sandbox, from any process

Types (see `fault_catalog()`; `remed fault ls`):
    resource     cpu-stress, memory-stress, disk-io (MicroRemed), disk-full, log-flood,
                 readonly-fs
    network      network-delay, network-loss (MicroRemed), firewall-drop
    application  pod-fail, config-error (MicroRemed, alias pod-config-error), hung-process,
                 wrong-dependency, port-taken, fd-exhaustion, bad-release
    compound     compound:<a>+<b>, two at once
"""

from __future__ import annotations

from typing import Any, Mapping

from e2e_reme.simulators.errors import FaultError, FaultUnavailable, UnknownFault
from e2e_reme.simulators.systems.target import ServiceTarget
from e2e_reme.simulators.faults.base import (CATEGORIES, COMPOUND_PREFIX, Fault, canonical_name, fault_available, fault_catalog,
                   fault_records, forget_faults, get_fault, host_report, injected_faults, register_fault)
from e2e_reme.simulators.faults.compound import Compound
from e2e_reme.simulators.faults.observe import observe


def make_fault(name: str, target: ServiceTarget, targets: Mapping[str, ServiceTarget] | None = None,
               params: Mapping[str, Any] | None = None, seed: int = 0) -> Fault:
    """A fault of type `name` (catalog name, alias or compound:a+b) aimed at `target`;
    `targets` (the deployment's) gives the addresses of its dependencies."""
    return get_fault(name)(target, targets, params, seed)


def recover_all(sb) -> list[str]:
    """Recover every fault recorded for the sandbox that is not recovered yet (newest
    first); return their names."""
    done = []
    for f in reversed(injected_faults(sb)):
        f.recover(sb)
        done.append(f.name)
    return done


__all__ = ["CATEGORIES", "COMPOUND_PREFIX", "Compound", "Fault", "FaultError", "FaultUnavailable",
           "UnknownFault", "canonical_name", "fault_available", "fault_catalog", "fault_records",
           "forget_faults", "get_fault", "host_report", "injected_faults", "make_fault", "observe",
           "recover_all", "register_fault"]
