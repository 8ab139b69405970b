"""Sandbox plumbing: what runs a system in isolation on this host, before any system is in it.

`base.py` (the interface, SSH, the registry), `backends/` (nspawn, libvirt), `state.py`
(records, the address allocator), `netguard.py` (nodes cannot call the host or other
sandboxes), `controller.py` (the jailed Ansible controller on the sandbox's own network),
`ansible.py` (ansible-runner), `hostview.py` (what the host sees of a node), `reaper.py`,
`kvm.py`, `doctor.py` (this host's capabilities)."""
