"""The playbook path: a policy's answer to an executed playbook.

`execution.py` (extract the YAML, size first; the syntax check and runs in the sandbox's
jailed controller), `gate.py` (the safety gate, defence in depth), `leftovers.py` (end what a
playbook left running before anyone judges the system)."""
