"""Read the ground truth of a node in one SSH round trip: for each service unit on it,
its systemd state, main process, the executable and code it runs, its configuration
(hashed after parsing, so that a rewrite with the same meaning is the same), who owns
its listening socket; and the node's boot id and sshd state.

The verifier compares these facts before and after a remediation; the reports use them
as observations. The script runs with the guest's python3 and needs nothing else.
"""

from __future__ import annotations

import json

from .sandbox import Sandbox
from .systems.target import ServiceTarget

# Runs in the guest. Input: JSON list of {unit, port, config_path, data_dir}.
_GUEST_SCRIPT = r'''
import hashlib, json, os, subprocess, sys

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except Exception as e:
        return ""

def sha(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None

def config_digest(path):
    try:
        text = open(path).read()
    except OSError:
        return None
    try:
        import yaml
        data = yaml.safe_load(text)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    except Exception:
        return hashlib.sha256(text.encode()).hexdigest()

def listeners():
    """port -> socket inode for TCP sockets in LISTEN state (v4 and v6)."""
    out = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            p = line.split()
            if p[3] == "0A":
                out.setdefault(int(p[1].rsplit(":", 1)[1], 16), p[9])
    return out

def socket_owners(inodes):
    want = {f"socket:[{i}]": i for i in inodes}
    owners = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target in want:
                    owners.setdefault(want[target], int(pid))
        except OSError:
            continue
    return owners

def cgroup_of(pid):
    try:
        for line in open(f"/proc/{pid}/cgroup"):
            if line.startswith("0::") or ":name=systemd:" in line:
                return line.strip().split(":", 2)[2]
    except OSError:
        return None
    return None

services = json.load(sys.stdin)
lis = listeners()
owners = socket_owners({lis[s["port"]] for s in services if s["port"] in lis})
props = ["ActiveState", "SubState", "MainPID", "NRestarts", "ExecMainStartTimestampMonotonic",
         "FragmentPath", "DropInPaths", "UnitFileState", "ExecStart", "CPUQuotaPerSecUSec", "MemoryMax",
         "LimitNOFILE"]
# A container shares the host kernel's boot id; its init's start time tells a reboot too.
init_start = open("/proc/1/stat").read().rsplit(")", 1)[1].split()[19]
out = {"boot_id": open("/proc/sys/kernel/random/boot_id").read().strip() + "/" + init_start,
       "sshd": sh("systemctl", "is-active", "ssh").strip(),
       "sshd_pid": sh("systemctl", "show", "-pMainPID", "--value", "ssh").strip(),
       "services": {}}
for s in services:
    show = sh("systemctl", "show", s["unit"], *[f"-p{p}" for p in props])
    info = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    pid = int(info.get("MainPID") or 0)
    exe = cmd = None
    if pid:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
        except OSError:
            pass
    code = None
    if cmd:
        for arg in cmd.split()[1:]:
            if arg.endswith(".py"):
                code = sha(arg)
                break
    owner = owners.get(lis.get(s["port"]))
    out["services"][s["unit"]] = {
        "active": info.get("ActiveState"), "sub": info.get("SubState"), "main_pid": pid,
        "restarts": int(info.get("NRestarts") or 0),
        "started_mono": info.get("ExecMainStartTimestampMonotonic"),
        "unit_file_state": info.get("UnitFileState"),
        "exec_start": info.get("ExecStart", "").split(" ; ignore_errors")[0],
        "drop_ins": info.get("DropInPaths", "").split(),
        "cpu_quota": info.get("CPUQuotaPerSecUSec"), "memory_max": info.get("MemoryMax"),
        "nofile": info.get("LimitNOFILE"),
        "exe": exe, "cmdline": cmd, "code_sha": code,
        "config_digest": config_digest(s["config_path"]),
        "listening": s["port"] in lis,
        "socket_owner_pid": owner,
        "socket_owner_cgroup": cgroup_of(owner) if owner else None,
        "data_dir_exists": os.path.isdir(s["data_dir"]),
    }
print(json.dumps(out))
'''


def probe_node(sb: Sandbox, node: int, targets: list[ServiceTarget], timeout: float = 30) -> dict | None:
    """Facts of one node and the given services on it; None if the node does not answer."""
    payload = json.dumps([{"unit": t.unit, "port": t.port, "config_path": t.config_path,
                           "data_dir": t.data_dir} for t in targets])
    # The script goes in a file first: `python3 -` would take stdin for the script itself.
    cmd = ("f=$(mktemp) && cat > $f <<'REMED_PROBE_EOF'\n" + _GUEST_SCRIPT + "\nREMED_PROBE_EOF\n"
           "python3 $f; rc=$?; rm -f $f; exit $rc")
    try:
        res = sb.exec(cmd, node=node, timeout=timeout, input=payload)
    except Exception:  # an unreachable node is a fact, not a crash
        return None
    if not res.ok:
        return None
    try:
        return json.loads(res.stdout)
    except ValueError:
        return None


def probe_all(sb: Sandbox, targets: dict[str, ServiceTarget]) -> dict[int, dict | None]:
    """probe_node for every node that runs at least one of the services."""
    by_node: dict[int, list[ServiceTarget]] = {}
    for t in targets.values():
        by_node.setdefault(t.node, []).append(t)
    for i in range(len(sb.nodes)):
        by_node.setdefault(i, [])
    return {i: probe_node(sb, i, ts) for i, ts in sorted(by_node.items())}
