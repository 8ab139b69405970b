"""Per-node resource limits and user namespaces of nspawn sandboxes (issue 13).

Exhausting a limit happens inside the node: a fork flood stops at pids.max, a 2 GiB write
fails with ENOSPC on the node's own disk image, a memory hog is OOM-killed in the node's
cgroup; the node keeps answering, the host stays healthy, and the next reset works. Every
exhaustion here is bounded (a count, a size, a timeout), and the limits are set small for
this module's sandbox so that each takes seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_reme.simulators import SandboxConfig, attach, create_sandbox, gc, list_sandboxes
from e2e_reme.simulators.sandbox.backends.nspawn import (_cgroup_dirs, _cgroup_pids, _children, _found_cgroup_dirs, _limits,
                                                 _loop_devices_below)
from e2e_reme.simulators.errors import SandboxError

LIMITS = dict(limit_pids=256, limit_memory_mib=512, limit_disk_mib=256, limit_cpus=1.0, limit_cpu_shares=512)


@pytest.fixture(scope="module")
def sb(image):
    with create_sandbox("nspawn", nodes=1, name="pt-limits", **LIMITS) as sandbox:
        yield sandbox


def machine(sb) -> str:
    return f"rm{sb.record.number}n0"


def cgroup_file(sb, name: str) -> str:
    (f,) = [cg / name for cg in _cgroup_dirs(machine(sb)) if (cg / name).exists()]
    return f.read_text().strip()


def disk_image(sb) -> Path:
    return sb.record.dir / sb.nodes[0].name / "disk.img"


def allocated_mib(path: Path) -> float:
    return path.stat().st_blocks * 512 / (1 << 20)


def still_answers_and_resets(sb) -> None:
    assert sb.exec("true", timeout=30).ok
    sb.reset()
    assert sb.exec("systemctl is-system-running --wait", timeout=60).stdout.strip() in ("running", "degraded")


# ---- the limits are where the kernel enforces them --------------------------------------

@pytest.mark.parametrize("control, expected", [
    ("pids.max", "256"),
    ("memory.limit_in_bytes", str(512 << 20)),
    ("memory.memsw.limit_in_bytes", str(512 << 20)),
    ("cpu.cfs_quota_us", "100000"),
    ("cpu.shares", "512"),
])
def test_the_nodes_cgroup_holds_each_limit(sb, control, expected):
    assert cgroup_file(sb, control) == expected


def test_describe_reports_the_limits_per_node(sb):
    lim = sb.describe()["limits"]
    assert lim == {"pids": 256, "memory_mib": 512, "cpus": 1.0, "cpu_shares": 512, "disk_mib": 256, "userns": True}


def test_a_process_attached_later_resets_with_the_same_limits(sb):
    other = attach("pt-limits")        # its config has the defaults; the record has the limits
    other.reset()
    assert cgroup_file(sb, "pids.max") == "256"
    size_mib = int(other.exec("df -BM --output=size /root | tail -1").stdout.strip().rstrip("M"))
    assert 240 <= size_mib <= 256          # the disk image less ext4's own metadata


@pytest.mark.parametrize("bad", [dict(limit_pids=-1), dict(limit_memory_mib=-5), dict(limit_cpus=-0.5),
                                 dict(limit_disk_mib=10), dict(limit_cpu_shares=1)])
def test_a_bad_limit_is_refused_before_any_node_boots(image, sb_name, bad):
    with pytest.raises(SandboxError, match="limit_"):
        create_sandbox("nspawn", nodes=1, name=sb_name, **bad)
    assert sb_name not in {r.name for r in list_sandboxes()}


def test_the_defaults_leave_room_for_the_faults_and_systems():
    lim = _limits(SandboxConfig())
    # memory-stress takes 1280 MiB beside up to 15 services of <= 64 MiB each on one node.
    assert lim["memory_mib"] >= 1280 + 15 * 64 + 256
    assert lim["pids"] >= 512 and lim["disk_mib"] >= 1024 and lim["cpus"] >= 1


def test_a_reset_remounts_the_node_without_stacking_mounts(sb):
    node_dir = sb.record.dir / sb.nodes[0].name
    sb.reset()
    sb.reset()
    with open("/proc/self/mountinfo") as f:
        points = sorted(line.split()[4].removeprefix(str(node_dir) + "/") for line in f if str(node_dir) in line)
    assert points == ["ids/root", "ids/rw", "merged", "rw"]


# ---- exhausting a limit is contained in the node ----------------------------------------

FORK_FLOOD = r"""
import errno, os, time
kids, err = [], None
for _ in range(4096):                 # bounded: at most 4096 forks, whatever the limit
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        time.sleep(20)
        os._exit(0)
    kids.append(pid)
print(len(kids), errno.errorcode.get(err, err))
for k in kids:
    os.kill(k, 9)
"""


def test_a_fork_flood_stops_at_pids_max(sb):
    res = sb.exec(["python3", "-c", FORK_FLOOD], timeout=60)
    forked, err = res.stdout.split()
    assert err == "EAGAIN", res
    assert 0 < int(forked) < 256
    assert sb.limit_events(0)["pids"] >= 1
    still_answers_and_resets(sb)


def test_a_2gib_write_fails_with_enospc_and_stays_off_the_hosts_disk(sb):
    free_before = os.statvfs(sb.record.dir).f_bavail * os.statvfs(sb.record.dir).f_frsize
    res = sb.exec("dd if=/dev/zero of=/root/big bs=1M count=2048 conv=fsync", timeout=120)
    free_after = os.statvfs(sb.record.dir).f_bavail * os.statvfs(sb.record.dir).f_frsize
    assert res.rc != 0 and "No space left on device" in res.stderr, res
    assert allocated_mib(disk_image(sb)) <= 256
    assert (free_before - free_after) < (1 << 30)     # what others write meanwhile is in it too
    assert sb.limit_events(0)["disk_full"]
    still_answers_and_resets(sb)
    # The reset gave the blocks back to the host (the image is mounted with discard).
    assert allocated_mib(disk_image(sb)) < 64


MEMORY_HOG = r"""
held = []
for _ in range(64):                    # bounded: 64 x 32 MiB = 2 GiB at most, pages touched
    held.append(b"x" * (32 << 20))
print("never here")
"""


def test_a_memory_hog_is_killed_inside_the_node_and_the_node_lives(sb):
    init = _children(sb.nodes[0].extra["pid"])
    before = sb.limit_events(0)["oom_kills"]
    res = sb.exec(["python3", "-c", MEMORY_HOG], timeout=60)
    assert res.rc == 137 and "never here" not in res.stdout, res
    assert sb.limit_events(0)["oom_kills"] > before
    assert _children(sb.nodes[0].extra["pid"]) == init       # the node's init was not the victim
    still_answers_and_resets(sb)


# ---- user namespace: node root is not host root -----------------------------------------

def test_node_root_is_an_unprivileged_user_on_the_host(sb):
    (init,) = _children(sb.nodes[0].extra["pid"])
    uid = int(Path(f"/proc/{init}/status").read_text().split("Uid:")[1].split()[0])
    assert uid >= 65536
    assert sb.exec("id -u").stdout.strip() == "0"


@pytest.mark.parametrize("attempt", [
    "echo max > /sys/fs/cgroup/pids/pids.max",
    "mount -o remount,rw /sys/fs/cgroup/pids && echo max > /sys/fs/cgroup/pids/pids.max",
    "mkdir -p /tmp/cg && mount -t cgroup -o pids none /tmp/cg && "
    "for f in $(find /tmp/cg -name pids.max); do echo max > $f; done",
    "mkdir -p /tmp/cg2 && mount -t cgroup -o memory none /tmp/cg2 && "
    "for f in $(find /tmp/cg2 -name memory.limit_in_bytes); do echo -1 > $f; done",
    "losetup -f --show /dev/zero",
    "mknod /tmp/vda b 254 0 && head -c 512 /tmp/vda",
])
def test_node_root_cannot_lift_its_limits_or_reach_host_devices(sb, attempt):
    res = sb.exec(attempt, timeout=30)
    assert not res.ok, res
    assert cgroup_file(sb, "pids.max") == "256"
    assert cgroup_file(sb, "memory.limit_in_bytes") == str(512 << 20)


# ---- nothing is left behind -------------------------------------------------------------

def ours_left(record) -> list[str]:
    machines = [f"rm{record.number}n{n.index}" for n in record.nodes]
    found = [f"loop {d}" for d in _loop_devices_below(record.dir)]
    found += [f"cgroup {cg}" for m in machines for cg in _found_cgroup_dirs(m)]
    found += [f"process {p}" for m in machines for p in _cgroup_pids(m)]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(record.dir) in line]
    return found


def test_stop_removes_every_loop_device_mount_and_cgroup(image, sb_name):
    sandbox = create_sandbox("nspawn", nodes=2, name=sb_name, limit_disk_mib=128)
    rec = sandbox.record
    assert len(ours_left(rec)) >= 4, "a running sandbox should hold loops, mounts and cgroups"
    sandbox.stop()
    assert ours_left(rec) == []


OWNER = """
import sys, time
from e2e_reme.simulators import create_sandbox
sb = create_sandbox("nspawn", nodes=1, name=sys.argv[1], reaper=False, limit_disk_mib=128)
print("up", flush=True)
time.sleep(600)
"""


def test_gc_after_a_sigkilled_owner_removes_every_loop_device_mount_and_cgroup(image, sb_name):
    proc = subprocess.Popen([sys.executable, "-c", OWNER, sb_name], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rec = attach(sb_name).record
    assert ours_left(rec)
    gc()
    assert ours_left(rec) == []


# ---- the defaults fit the largest system (slow: deploys train-ticket) -------------------

def node_use(sb, index: int) -> dict:
    m = f"rm{sb.record.number}n{index}"
    use = {}
    for cg in _cgroup_dirs(m):
        for name, key in (("pids.current", "pids"), ("memory.max_usage_in_bytes", "memory_peak_mib")):
            if (cg / name).exists():
                v = int((cg / name).read_text())
                use[key] = v if key == "pids" else round(v / (1 << 20))
    st = os.statvfs(sb.record.dir / sb.nodes[index].name / "rw")
    use["disk_used_mib"] = round((st.f_blocks - st.f_bfree) * st.f_frsize / (1 << 20))
    return use


@pytest.mark.slow
def test_train_ticket_under_its_load_stays_well_inside_the_default_limits(image, sb_name):
    from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
    from e2e_reme.simulators.systems.loadgen import run_load
    lim = _limits(SandboxConfig())
    with create_sandbox("nspawn", nodes=3, name=sb_name) as sandbox:
        dep = deploy(sandbox, "train-ticket")
        sandbox.checkpoint()
        wait_healthy(sandbox, dep, timeout_s=120)
        load = run_load(dep)
        use = [node_use(sandbox, i) for i in range(3)]
    print(f"\ntrain-ticket under its SLO load ({load.sent} requests, {load.ok} ok), per node: {use}")
    assert load.ok == load.sent
    for u in use:
        assert u["pids"] < lim["pids"] // 4
        assert u["memory_peak_mib"] + 1280 + 512 < lim["memory_mib"]    # memory-stress (1280 MiB) and room
        assert u["disk_used_mib"] < lim["disk_mib"] // 4
