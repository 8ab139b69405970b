"""Microservice systems: what runs inside a sandbox, to be broken and repaired.

- `spec`: one YAML file per system in `specs/` (services, call graph, per-request work,
  limits, placement, entry, request mix, SLO), validated with file:line errors.
- `deploy`: renders each node's configs/units/seed data and installs them with one
  Ansible play (`simulators.sandbox.ansible.run_playbook`), waits for health, records a
  `Deployment` (with a `ServiceTarget` per service) in the sandbox's state directory.
- `loadgen`: drives the entry from the host at a fixed rate; checks the SLO; a
  background mode measures disruption.
- `probe`: the ground truth of a node in one SSH round trip (units, processes, code,
  configuration, sockets), which the reports observe and the verifier judges on.
- The service runtime itself is `vm_images/files/opt/remed/service.py`, baked into the
  guest image as `/opt/remed/service.py`.

Shipped systems: simple-micro (2 services, 1 node), boutique (10 services + redis-cart,
2 nodes), train-ticket (45 services, 3 nodes).
"""

# Lazy (PEP 562): `from e2e_reme.simulators.systems.target import ServiceTarget` (what the
# faults and the verifier import) must not pull in Ansible, the sandbox and the loader.
_EXPORTS = {
    "deploy": ["Deployment", "Health", "deploy_system", "load_deployment", "health", "health_all", "metrics",
               "request_entry", "verify_seed", "wait_healthy"],
    "loadgen": ["BackgroundLoad", "LoadResult", "SLOCheck", "check_slo", "disruption", "run_load"],
    "spec": ["SLO", "SpecError", "SystemSpec", "list_systems", "load_system"],
    "target": ["ServiceTarget"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        # `deploy` is also the submodule's name, so the function is exported as deploy_system.
        attr = "deploy" if name == "deploy_system" else name
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
