"""E2E-REME: end-to-end microservice remediation.

Stages, in the order data flows (each a sub-package, each importing only from earlier ones):

    vm_images   guest image recipe and builder          (e2e_reme.vm_images)
    simulators  sandboxes, systems, faults, verifier    (e2e_reme.simulators)
    cluster     Ray fleet of sandbox hosts              (e2e_reme.cluster)
    train       policy model, SFT, GRPO                 (e2e_reme.train)
    serve       Ray Serve remediation endpoint          (e2e_reme.serve)

`e2e_reme.cli` is the `remed` command that ties them together.
"""

__version__ = "0.1.0"
