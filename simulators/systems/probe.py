"""Read the ground truth of a node in one SSH round trip: for each service unit on it,
its systemd state, main process, the executable and code it runs, its configuration
(hashed after parsing, so that a rewrite with the same meaning is the same), who owns
its listening socket; and the node's boot id and sshd state.

The verifier compares these facts before and after a remediation; the reports use them
as observations.

The script is the verifier's own toolset: it travels in the command itself (nothing of it
rests on the node to be swapped), runs as `/usr/bin/python3 -I -S` (no PYTHON* variable,
no user site, no `site` at all: no `.pth`, no `sitecustomize`), imports only built-in
and standard modules, and calls tools by absolute path (no PATH lookup, and not through
the sandbox's `timeout`/`sh` wrapper). Parsing the configuration happens on the host, with
the host's yaml. TOOLSET_SHA256 names the exact script in every verdict. What stays
trusted on a node (its kernel, /usr/bin/python3 and its standard library, systemctl,
root's login shell) is listed in docs/verdict.md; on nspawn the runtime check reads the
node's changed files from the host, so a replaced one of these fails the verdict.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time

from e2e_reme.simulators.sandbox.base import Sandbox
from e2e_reme.simulators.systems.target import ServiceTarget

# Runs in the guest. Input: JSON list of {unit, port, config_path, data_dir}.
_GUEST_SCRIPT = r'''
import hashlib, json, os, subprocess, sys

SYSTEMCTL = next((p for p in ("/usr/bin/systemctl", "/bin/systemctl") if os.path.exists(p)), "/usr/bin/systemctl")

def sh(*cmd):
    if cmd and cmd[0] == "systemctl":
        cmd = (SYSTEMCTL,) + cmd[1:]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, env={"PATH": "/nonexistent"}).stdout
    except Exception as e:
        return ""

def sha(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None

def config_text(path):
    try:
        with open(path, "rb") as f:
            return f.read(262144).decode(errors="replace")
    except OSError:
        return None

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
        "config_text": config_text(s["config_path"]),
        "listening": s["port"] in lis,
        "socket_owner_pid": owner,
        "socket_owner_cgroup": cgroup_of(owner) if owner else None,
        "data_dir_exists": os.path.isdir(s["data_dir"]),
    }
print(json.dumps(out))
'''


# Runs in a libvirt guest, where the host cannot look in: the facts hostview reads from the
# host on nspawn, in the same shape, for the verifier's `runtime` check. Per unit its main
# process's executable, command line, code hash, environment and executable mappings; the
# node's files (content hashes where interpreter hooks, drop-ins, tools and configuration
# live; elsewhere a stat signature with ctime and inode, which a write cannot keep); the
# runtime drop-ins under /run. Input: JSON {units, volatile, volatile_env, content,
# run_dirs, hash_limit}.
_RUNTIME_SCRIPT = r'''
import hashlib, json, os, stat, subprocess, sys

want = json.load(sys.stdin)
SYSTEMCTL = next((p for p in ("/usr/bin/systemctl", "/bin/systemctl") if os.path.exists(p)), "/usr/bin/systemctl")
LIMIT = want["hash_limit"]

def sha(path, limit=LIMIT):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        h, left = hashlib.sha256(), limit
        while left > 0:
            b = os.read(fd, min(1 << 20, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)

def main_pid(unit):
    try:
        out = subprocess.run([SYSTEMCTL, "show", "-pMainPID", "--value", unit], capture_output=True,
                             text=True, timeout=10, env={"PATH": "/nonexistent"}).stdout
        return int(out.strip() or 0)
    except Exception:
        return 0

def service(unit):
    pid = main_pid(unit)
    if not pid:
        return {"running": False}
    try:
        exe = os.readlink("/proc/%d/exe" % pid)
        argv = [a.decode(errors="replace") for a in open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0") if a]
        raw = open("/proc/%d/environ" % pid, "rb").read()
        maps = set()
        for line in open("/proc/%d/maps" % pid):
            parts = line.split(None, 5)
            if len(parts) == 6 and "x" in parts[1] and parts[5].startswith("/"):
                maps.add(parts[5].strip())
    except OSError:
        return {"running": False}
    env = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            if k.decode(errors="replace") not in want["volatile_env"]:
                env[k.decode(errors="replace")] = v.decode(errors="replace")
    code = next((a for a in argv[1:] if a.endswith(".py")), None)
    return {"running": True, "pid": pid, "ns_pid": pid, "exe": exe, "argv": argv,
            "code_sha": sha(code) if code else None, "environ": dict(sorted(env.items())),
            "maps": sorted(maps)}

def describe(path, rel, st):
    if stat.S_ISLNK(st.st_mode):
        try:
            return "l:" + os.readlink(path)
        except OSError:
            return "gone"
    if stat.S_ISREG(st.st_mode):
        mode = "%o" % stat.S_IMODE(st.st_mode)
        if rel.startswith(tuple(want["content"])) and st.st_size <= LIMIT:
            return "f:%s:%s" % (sha(path), mode)
        return "f:size=%d,mtime=%d,ctime=%d,ino=%d:%s" % (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, mode)
    return "o:%o" % st.st_mode

files, root_dev = {}, os.lstat("/").st_dev
volatile = tuple(want["volatile"])
for dirpath, dirs, names in os.walk("/"):
    rel_dir = dirpath.lstrip("/") + "/" if dirpath != "/" else ""
    keep = []
    for d in dirs:
        full, rel = os.path.join(dirpath, d), rel_dir + d
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            files["/" + rel] = describe(full, rel, st)
        elif st.st_dev == root_dev and not (rel + "/").startswith(volatile):
            keep.append(d)     # other filesystems (/proc, /sys, /dev, /run, tmpfs) are not the node's files
    dirs[:] = keep
    for n in names:
        full, rel = os.path.join(dirpath, n), rel_dir + n
        if rel.startswith(volatile):
            continue
        try:
            files["/" + rel] = describe(full, rel, os.lstat(full))
        except OSError:
            pass

dropins = {}
for top in want["run_dirs"]:
    for dirpath, dirs, names in os.walk(top):
        for n in names:
            if dirpath == top and not n.endswith(".conf"):
                continue
            dropins[os.path.join(dirpath, n)] = sha(os.path.join(dirpath, n), 65536) or hashlib.sha256(b"").hexdigest()

print(json.dumps({"services": {u: service(u) for u in want["units"]}, "upper": files, "run_dropins": dropins}))
'''

TOOLSET_SHA256 = hashlib.sha256((_GUEST_SCRIPT + _RUNTIME_SCRIPT).encode()).hexdigest()
PYTHON = "/usr/bin/python3"


def toolset_exec(sb: Sandbox, node: int, script: str, input: str = "", timeout: float = 30
                 ) -> tuple[int, str] | None:
    """Run one of the verifier's scripts on a node as `/usr/bin/python3 -I -S -c SCRIPT`,
    straight over the SSH transport (no wrapper looked up on the node's PATH). (rc, stdout),
    or None if the node does not answer."""
    cmd = f"{PYTHON} -I -S -c {shlex.quote(script)}"
    try:
        chan = sb._ssh(node).get_transport().open_session(timeout=10)
    except Exception:
        sb._drop_client(node)
        try:
            chan = sb._ssh(node).get_transport().open_session(timeout=10)
        except Exception:   # an unreachable node is a fact, not a crash
            return None
    try:
        chan.settimeout(timeout)
        chan.exec_command(cmd)
        if input:
            chan.sendall(input.encode())
        chan.shutdown_write()
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = chan.recv(65536)
            if not b:
                break
            out.append(b)
        return chan.recv_exit_status(), b"".join(out).decode(errors="replace")
    except Exception:
        return None
    finally:
        chan.close()


def config_digest(text: str | None) -> str | None:
    """The configuration's meaning, hashed on the host: a rewrite that means the same is
    the same."""
    if text is None:
        return None
    try:
        import yaml
        data = yaml.safe_load(text)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    except Exception:
        return hashlib.sha256(text.encode()).hexdigest()


def probe_node(sb: Sandbox, node: int, targets: list[ServiceTarget], timeout: float = 30) -> dict | None:
    """Facts of one node and the given services on it; None if the node does not answer."""
    payload = json.dumps([{"unit": t.unit, "port": t.port, "config_path": t.config_path,
                           "data_dir": t.data_dir} for t in targets])
    res = toolset_exec(sb, node, _GUEST_SCRIPT, payload, timeout)
    if res is None or res[0] != 0:
        return None
    try:
        facts = json.loads(res[1])
    except ValueError:
        return None
    for svc in facts.get("services", {}).values():
        svc["config_digest"] = config_digest(svc.pop("config_text", None))
    facts["toolset"] = TOOLSET_SHA256
    return facts


_HASH_SCRIPT = r'''
import hashlib, json, sys
out = {}
for p in json.load(sys.stdin):
    try:
        with open(p, "rb") as f:
            out[p] = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        out[p] = None
print(json.dumps(out))
'''


def hash_files(sb: Sandbox, node: int, paths: list[str]) -> dict[str, str | None]:
    """sha256 of files on a node, by the verifier's own code: read from the host through
    the node's root (nspawn), else by the isolated toolset on the node."""
    from e2e_reme.simulators.sandbox import hostview
    if hostview.supported(sb):
        tree = hostview.node_tree(sb, node)
        if tree is not None:
            with tree:
                return {p: tree.sha256(p) for p in paths}
    res = toolset_exec(sb, node, _HASH_SCRIPT, json.dumps(paths))
    if res is None or res[0] != 0:
        return {}
    try:
        return json.loads(res[1])
    except ValueError:
        return {}


# Where the guest's runtime facts hash content: interpreter hooks, drop-ins, tools on PATH,
# configuration, the services' code. The rest of the tree (/usr/lib, /usr/share) is judged
# by stat signature: hashing it on an emulated CPU would cost minutes.
CONTENT_TREES = ("etc/", "usr/local/", "usr/bin/", "usr/sbin/", "usr/lib/python3/", "usr/lib/python3.11/",
                 "usr/lib/systemd/", "opt/", "srv/", "root/", "home/", "var/lib/")
# Files a libvirt guest itself rewrites in normal operation (its DHCP client).
GUEST_VOLATILE = ("etc/resolv.conf",)


def guest_runtime_facts(sb: Sandbox, node: int, units: list[str], timeout: float = 120) -> dict | None:
    """hostview.node_facts for a node the host cannot look into (libvirt), read by the
    verifier's toolset; None if the node does not answer."""
    from e2e_reme.simulators.sandbox.hostview import HASH_LIMIT, RUN_DROPIN_DIRS, VOLATILE_ENV, VOLATILE_PATHS
    want = {"units": units, "volatile": list(VOLATILE_PATHS + GUEST_VOLATILE), "volatile_env": sorted(VOLATILE_ENV),
            "content": list(CONTENT_TREES), "run_dirs": list(RUN_DROPIN_DIRS), "hash_limit": HASH_LIMIT}
    res = toolset_exec(sb, node, _RUNTIME_SCRIPT, json.dumps(want), timeout)
    if res is None or res[0] != 0:
        return None
    try:
        return json.loads(res[1])
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
