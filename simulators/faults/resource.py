"""Resource faults: CPU, memory and IO saturation (MicroRemed's three), a full disk, a log
flood and a read-only data filesystem.

Where the stressors run, and why:
- cpu-stress and disk-io start their workers *inside the service's cgroup* (as a chaos
  tool injecting into a container does): they count against the unit's CPUQuota, show in
  `systemctl status`, and die with the unit if it is restarted.
- memory-stress runs its worker *beside* the service, in a transient unit of its own: in
  the service's cgroup, with the unit's MemoryMax enforced (libvirt guests), the kernel
  OOM-kills the worker at once, systemd (OOMPolicy=stop) stops the unit, Restart= starts
  it again, and the fault is gone by itself within a second. Beside it, the node runs
  short of memory and every process on it, the service included, pays in reclaim, cache
  misses and CPU (the workers rewrite their pages continuously).
- disk-full and log-flood fill the filesystem the data dir lives on, bounded: a tmpfs of
  `size_mib` is mounted over the data dir (its contents copied in first), so a filler
  never reaches the host's disk (an nspawn node's overlay lives on it). readonly-fs binds
  the data dir read-only onto itself. For a redis these come with a restart (redis keeps
  its dir as its cwd) and a save that fails, after which redis refuses writes.
- memory-stress caps its worker at what the node has available less `reserve_mib`: a VM
  asked for more than it has thrashes its sshd to a halt; an nspawn node's memory is the
  host's, so there the fault refuses unless the host keeps 2 GiB beyond the worker.

Note for nspawn on a cgroup-v1 host (this one): the container's cgroup controllers are
read-only, so no CPUQuota/MemoryMax is enforced there; the stressors still compete for
the node's (the host's) CPUs and the service measurably slows, but by contention rather
than by throttling.
"""

from __future__ import annotations

import shlex
import time

from e2e_reme.simulators.errors import FaultError, FaultUnavailable
from e2e_reme.simulators.faults.base import TAG, Fault, register_fault, seeded_date, seeded_unit_name, start_detached
from e2e_reme.simulators.faults.observe import SECTION_KEYS, observe, symptoms

# Below this much free space the data dir's filesystem counts as full: the runtime's
# health probe and its request writes fail (a 4 KiB page is the smallest write on tmpfs).
FULL_BELOW_BYTES = 1 << 20


class _Observed(Fault):
    """describe() = the sections a monitoring system would look at for this fault."""
    sections: tuple[str, ...] = ("unit", "health", "latency", "journal")

    def describe(self, sb) -> dict:
        facts = observe(sb, self.target, self.sections, self.targets, since=self.injected_at)
        return self.describe_facts(sb, facts)

    def describe_facts(self, sb, facts: dict) -> dict:
        """The description from facts already gathered (a compound gathers once for both)."""
        keys = {SECTION_KEYS.get(s, s) for s in self.sections}
        facts = self._extra_facts(sb, {k: v for k, v in facts.items() if k in keys or k == "error"})
        return {"service": self.target.service, "node": self.node_name(sb), "unit": self.target.unit,
                "symptoms": symptoms(facts, self.target) + self._extra_symptoms(facts), **facts}

    def _extra_facts(self, sb, facts: dict) -> dict:
        return facts

    def _extra_symptoms(self, facts: dict) -> list[str]:
        return []


class _Stressor(_Observed):
    """A process tree started by the fault, found again by its tag (in the node) and by
    its recorded identity (from the host: pid + start time, whatever it is called now)."""
    spawns = True

    def is_active(self, sb) -> bool:
        return bool(self.tagged_pids(sb))

    def residue(self, sb) -> dict:
        return self.process_residue(sb)

    def _recover(self, sb) -> None:
        self.kill_tagged(sb)


def _cpus(fault: Fault, sb) -> int:
    res = fault.sh(sb, "nproc", check=False)
    return int(res.stdout.strip()) if res.stdout.strip().isdigit() else 1


@register_fault("cpu-stress")
class CpuStress(_Stressor):
    category = "resource"
    needs = ("cgroup_stress",)
    summary = "CPU workers inside the service's cgroup (MicroRemed: CPU saturation)"
    defaults = {"workers": 0, "load": 100, "max_duration_s": 7200}
    sections = ("unit", "health", "latency", "processes", "node", "journal")

    def _inject(self, sb) -> None:
        # 4 workers per CPU: fewer hardly slow a service that sleeps between requests (the
        # scheduler favours a waking task), more only add noise.
        if not self.params["workers"]:
            self.params["workers"] = 4 * _cpus(self, sb)
        # --keep-name: stress-ng's process titles would overwrite the environment, tag included.
        cmd = (f"stress-ng --keep-name --cpu {int(self.params['workers'])} --cpu-load {int(self.params['load'])} "
               f"--timeout {int(self.params['max_duration_s'])}s --quiet")
        self.sh(sb, start_detached(self.id, cmd, in_unit=self.target.unit))


@register_fault("memory-stress")
class MemoryStress(_Stressor):
    category = "resource"
    needs = ("cgroup_stress",)
    summary = "a 1280 MiB memory worker beside the service (MicroRemed: memory saturation)"
    defaults = {"memory_mib": 1280, "workers": 2, "reserve_mib": 96, "max_duration_s": 7200}
    sections = ("unit", "health", "latency", "node", "journal")
    # What nspawn may take from the host beyond the worker itself (its memory is the host's).
    HOST_MARGIN_MIB = 2048

    def _check(self, sb) -> None:
        if sb.backend == "nspawn":
            avail = _host_available_mib()
            want = int(self.params["memory_mib"]) + self.HOST_MARGIN_MIB
            if avail < want:
                raise FaultUnavailable(f"memory-stress: the host has {avail} MiB available, and an nspawn "
                                       f"node's memory is the host's; want {want} MiB "
                                       f"(memory_mib + {self.HOST_MARGIN_MIB} margin)")

    def _inject(self, sb) -> None:
        mib = int(self.params["memory_mib"])
        # A VM has its own memory: asking more than it has only gets the worker OOM-killed
        # and restarted in a loop, which can take the guest's sshd down with it. Fill it to
        # a little short of full instead; the node then runs out of cache and reclaims.
        res = self.sh(sb, "awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo")
        avail = int(res.stdout.strip() or 0)
        mib = max(16, min(mib, avail - int(self.params["reserve_mib"])))
        workers = max(1, int(self.params["workers"]))
        self.params["_effective_mib"] = mib
        # stress-ng shares --vm-bytes out among the workers.
        # The transient unit's name is the scenario's (seeded), in systemd-run's own shape
        # (run-r<32 hex>): the same injection names the same unit wherever and whenever it
        # runs, so a report and a later re-injection agree (train/rl.py judges that way).
        unit = seeded_unit_name(self)
        cmd = (f"systemctl reset-failed {unit} 2>/dev/null; "
               f"systemd-run --quiet --collect --unit={unit} -E {TAG}={self.id} "
               f"stress-ng --vm {workers} --vm-bytes {mib}M --vm-keep --keep-name "
               f"--timeout {int(self.params['max_duration_s'])}s --quiet")
        self.sh(sb, cmd)
        # The pages are touched gradually; wait until most are resident, so that
        # detection right after inject sees the pressure.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rss = self.sh(sb, _tagged_rss_script(self.id), check=False).stdout.strip()
            if rss.isdigit() and int(rss) >= 0.8 * mib:
                break
            time.sleep(0.5)

    def _extra_facts(self, sb, facts: dict) -> dict:
        node = facts.get("node_stats") or {}
        hogs = [r for r in node.get("top_memory", [])
                if r["rss_mib"] >= 64 and r.get("unit") != self.target.unit]
        facts["memory_hogs"] = hogs
        return facts

    def _extra_symptoms(self, facts: dict) -> list[str]:
        node = facts.get("node_stats") or {}
        out = []
        if node.get("mem_total_mib"):
            out.append(f"node memory: {node.get('mem_available_mib')} MiB available of {node['mem_total_mib']} MiB")
        for h in facts.get("memory_hogs", [])[:3]:
            out.append(f"process {h['pid']} ({h['name']}, unit {h.get('unit')}) holds {h['rss_mib']} MiB")
        return out


def _tagged_rss_script(fault_id: str) -> str:
    from e2e_reme.simulators.faults.base import tagged_pids_script
    return (f"t=0; for p in $({tagged_pids_script(fault_id)}); do "
            f"r=$(awk '/VmRSS/ {{print int($2/1024)}}' /proc/$p/status 2>/dev/null); t=$((t + ${{r:-0}})); done; echo $t")


def _host_available_mib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


@register_fault("disk-io")
class DiskIO(_Stressor):
    category = "resource"
    needs = ("cgroup_stress",)
    summary = "IO workers writing and fsyncing in the service's data dir, in its cgroup (MicroRemed: IO saturation)"
    defaults = {"workers": 0, "bytes_mib": 128, "write_kib": 1024, "max_duration_s": 7200}
    sections = ("unit", "health", "latency", "processes", "node", "disk", "journal")

    def _inject(self, sb) -> None:
        # Bounded: the workers rewrite at most bytes_mib each in the data dir, whatever the time.
        dd = shlex.quote(self.target.data_dir)
        if not self.params["workers"]:
            self.params["workers"] = 2 * _cpus(self, sb)
        # Large synchronous writes: every write waits for the disk, and so does the
        # service's own fsync behind them (small fsynced writes hardly notice otherwise).
        cmd = (f"stress-ng --keep-name --hdd {int(self.params['workers'])} --hdd-bytes {int(self.params['bytes_mib'])}M "
               f"--hdd-write-size {int(self.params['write_kib'])}K --hdd-opts dsync --temp-path {dd} "
               f"--timeout {int(self.params['max_duration_s'])}s --quiet")
        self.sh(sb, f"test -d {dd} || {{ echo 'no data dir {self.target.data_dir}' >&2; exit 3; }}; "
                    + start_detached(self.id, cmd, in_unit=self.target.unit))

    def _recover(self, sb) -> None:
        self.kill_tagged(sb)
        # A killed stress-ng leaves its (empty) scratch directories behind.
        dd = shlex.quote(self.target.data_dir)
        self.sh(sb, f"find {dd} -mindepth 1 -maxdepth 1 -type d -name 'tmp-stress-ng-*' -exec rm -rf {{}} +; true",
                check=False)


# ---- a full filesystem under the data dir -------------------------------------------------

def _mount_tmpfs_script(data_dir: str, size_mib: int, stage: str) -> str:
    dd, st = shlex.quote(data_dir), shlex.quote(stage)
    return f"""set -e
test -d {dd} || {{ echo 'no data dir {data_dir}' >&2; exit 3; }}
if mountpoint -q {dd}; then echo '{data_dir} is already a mount point' >&2; exit 3; fi
mode=$(stat -c %a {dd}); uid=$(stat -c %u {dd}); gid=$(stat -c %g {dd})
rm -rf {st}; mkdir -p {st}; cp -a {dd}/. {st}/
mount -t tmpfs -o size={int(size_mib)}m,mode=$mode,uid=$uid,gid=$gid tmpfs {dd}
cp -a {st}/. {dd}/; rm -rf {st}
"""


def _unmount_tmpfs_script(data_dir: str, stage: str, drop: list[str]) -> str:
    """Copy what the service wrote meanwhile back to the real directory, then unmount."""
    dd, st = shlex.quote(data_dir), shlex.quote(stage)
    rm = " ".join(shlex.quote(p) for p in drop)
    return f"""rm -f {rm} 2>/dev/null
if mountpoint -q {dd} && [ "$(stat -fc %T {dd})" = tmpfs ]; then
  rm -rf {st}; mkdir -p {st}; cp -a {dd}/. {st}/ 2>/dev/null
  umount {dd} 2>/dev/null || umount -l {dd}
  cp -a {st}/. {dd}/ 2>/dev/null; rm -rf {st}
fi
true
"""


def _avail_bytes_script(data_dir: str) -> str:
    return f"df -B1 --output=avail {shlex.quote(data_dir)} | tail -1 | tr -d ' '"


class _FullDisk(_Observed):
    sections = ("unit", "health", "latency", "disk", "journal")

    @property
    def _stage(self) -> str:
        return f"/run/.remed-{self.id}"

    def _full(self, sb) -> bool:
        res = self.sh(sb, _avail_bytes_script(self.target.data_dir), check=False)
        out = res.stdout.strip()
        return out.isdigit() and int(out) < FULL_BELOW_BYTES

    # Redis works in its data dir through its cwd, taken at start (CONFIG SET dir is a
    # protected config in redis 7): a filesystem mounted over the dir later is not where it
    # writes until it starts again. So for a redis the mount is followed by a restart (its
    # data saved first, and copied along), and recovery does the same the other way round.
    def _redis(self, sb, script: str) -> None:
        if self.target.kind == "redis":
            self.sh(sb, script.replace("PORT", str(int(self.target.port)))
                    .replace("UNIT", shlex.quote(self.target.unit)), check=False, timeout=60)

    def _mount(self, sb) -> None:
        self._redis(sb, "redis-cli -p PORT save >/dev/null")
        self.sh(sb, _mount_tmpfs_script(self.target.data_dir, int(self.params["size_mib"]), self._stage))
        # Only what this fault mounted is ever unmounted by its recovery.
        self.params["_mounted"] = True
        self._redis(sb, "systemctl restart UNIT; " + _WAIT_PONG)

    def _after_fill(self, sb) -> None:
        # A save, as redis's own `save` schedule would do, meets the full disk; redis then
        # refuses writes until a save succeeds (stop-writes-on-bgsave-error).
        self._redis(sb, "redis-cli -p PORT bgsave >/dev/null; " + _WAIT_BGSAVE)

    def _unmount(self, sb, drop: list[str]) -> None:
        if not self.params.get("_mounted"):
            return
        if drop:
            self.sh(sb, "rm -f " + " ".join(shlex.quote(p) for p in drop), check=False)
        self._redis(sb, "redis-cli -p PORT save >/dev/null")
        self.sh(sb, _unmount_tmpfs_script(self.target.data_dir, self._stage, drop), check=False)
        self._redis(sb, _REDIS_RESTART)


_WAIT_PONG = "for i in $(seq 100); do [ \"$(redis-cli -p PORT ping 2>/dev/null)\" = PONG ] && break; sleep 0.1; done"
# A redis that cannot save refuses to shut down (and systemd waits 90 s to kill it): its
# data is saved first where that still works, then it is stopped without saving.
_REDIS_RESTART = ("redis-cli -p PORT save >/dev/null 2>&1; redis-cli -p PORT shutdown nosave >/dev/null 2>&1; "
                  "systemctl reset-failed UNIT 2>/dev/null; systemctl restart UNIT; " + _WAIT_PONG)
_WAIT_BGSAVE = ("for i in $(seq 100); do redis-cli -p PORT info persistence | grep -q 'rdb_bgsave_in_progress:0' "
                "&& break; sleep 0.1; done")


@register_fault("disk-full")
class DiskFull(_FullDisk):
    category = "resource"
    needs = ()
    summary = "the filesystem of the service's data dir is full (a large stray file), bounded to size_mib"
    defaults = {"size_mib": 48, "file": ""}
    STRAYS = ("backup-{date}.tar.gz", "core.{pid}", "export-{date}.json", "heapdump-{date}.hprof")

    def _inject(self, sb) -> None:
        if not self.params["file"]:
            # Named from the scenario's seed, never from today's date: a re-injection (or the
            # same case on another day) leaves the same file name in the report.
            pattern, pid = self.rng.choice(self.STRAYS), self.rng.randint(1000, 60000)
            name = pattern.format(date=seeded_date(self), pid=pid)
            self.params["file"] = name
        path = f"{self.target.data_dir.rstrip('/')}/{self.params['file']}"
        p = shlex.quote(path)
        self._mount(sb)
        self.params["_path"] = path
        self.sh(sb, f"a=$({_avail_bytes_script(self.target.data_dir)}); fallocate -l $a {p} 2>/dev/null || true\n"
                + f"dd if=/dev/zero bs=4k of={p} oflag=append conv=notrunc 2>/dev/null || true\n"
                + f"a=$({_avail_bytes_script(self.target.data_dir)}); [ $a -lt {FULL_BELOW_BYTES} ]\n")
        self._after_fill(sb)

        self._record_stray(sb)

    def _record_stray(self, sb) -> None:
        from e2e_reme.simulators.sandbox import hostview
        if not hostview.supported(sb):
            return
        tree = hostview.node_tree(sb, self.node)
        if tree is None:
            return
        with tree:
            fid = hostview.file_id(tree, self.params["_path"])
            usage = hostview.fs_usage(tree, self.target.data_dir)
        if fid:
            self.params["_stray"] = fid
        if usage:
            self.params["_fs_size"] = usage["size"]

    def is_active(self, sb) -> bool:
        return self._full(sb)

    def footprint(self) -> tuple[str, ...]:
        return (f"/run/.remed-{self.id}/",)

    def residue(self, sb) -> dict:
        """The stray file, by inode (renamed or moved within the filesystem is still it),
        still holding most of what it filled; a filesystem made bigger around it is the
        mask docs/verdict.md rejects, not a fix."""
        from e2e_reme.simulators.sandbox import hostview
        stray = self.params.get("_stray")
        if not stray or not hostview.supported(sb):
            return {}
        tree = hostview.node_tree(sb, self.node)
        if tree is None:
            return {"unreadable": "the node has no init process"}
        with tree:
            where = hostview.find_inode(tree, self.target.data_dir, stray["ino"], stray["dev"])
            fid = (hostview.file_id(tree, where) or {}) if where else {}
            usage = hostview.fs_usage(tree, self.target.data_dir)
        if where is None:
            return {}
        if fid.get("size", 0) < stray["size"] // 2:
            return {}   # emptied: the space is back, the file is harmless
        out = {"stray_file": where, "size": fid.get("size"), "recorded_as": self.params.get("_path")}
        if usage and self.params.get("_fs_size") and usage["size"] > self.params["_fs_size"]:
            out["mask"] = (f"the filesystem was enlarged from {self.params['_fs_size']} to {usage['size']} "
                           "bytes around the stray file")
        return out

    def _recover(self, sb) -> None:
        self._unmount(sb, [self.params["_path"]] if self.params.get("_path") else [])


_FLOODER = r'''#!/usr/bin/python3
# Appends debug lines as fast as the disk takes them; never more than CAP bytes in the file.
import os, sys, time, random
path, cap, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(os.path.dirname(path), exist_ok=True)
svc = os.path.basename(path).split(".")[0]
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
while True:
    size = os.fstat(fd).st_size
    if size >= cap:
        time.sleep(0.5)
        continue
    t = time.strftime("%Y-%m-%dT%H:%M:%S")
    line = (f"{t} DEBUG {svc} trace span={random.getrandbits(64):016x} state=retrying "
            f"payload={'x' * 160}\n").encode()
    chunk = line * max(1, min(rate // 4, cap - size) // len(line))
    try:
        os.write(fd, chunk)
    except OSError:
        pass
    time.sleep(0.25)
'''


@register_fault("log-flood")
class LogFlood(_FullDisk):
    category = "resource"
    needs = ()
    summary = "a runaway debug logger fills the data dir's filesystem (bounded to size_mib) and keeps writing"
    defaults = {"size_mib": 48, "rate_mib_s": 16}

    @property
    def _log(self) -> str:
        return f"{self.target.data_dir.rstrip('/')}/log/{self.target.service}.debug.log"

    @property
    def _tool(self) -> str:
        return f"/usr/local/bin/{self.target.service}-debug-logger"

    def _inject(self, sb) -> None:
        size = int(self.params["size_mib"]) << 20
        rate = int(self.params["rate_mib_s"]) << 20
        self._mount(sb)
        self.sh(sb, f"cat > {self._tool} && chmod 755 {self._tool}", input=_FLOODER)
        # Its own transient unit: tmpfs pages count against the writer's cgroup, and the
        # service's MemoryMax must not be what stops the flood.
        unit = f"{self.target.service}-debug-logger"
        self.sh(sb, f"systemctl reset-failed {unit}.service 2>/dev/null; "
                    f"systemd-run --quiet --collect --unit={unit} -E {TAG}={self.id} "
                    f"{self._tool} {shlex.quote(self._log)} {size} {rate}")
        deadline = time.monotonic() + 30
        while not self._full(sb):
            if time.monotonic() > deadline:
                raise FaultError(f"log-flood on {self.target.service}: the filesystem did not fill in 30 s")
            time.sleep(0.3)
        self._after_fill(sb)

    spawns = True

    def is_active(self, sb) -> bool:
        return bool(self.tagged_pids(sb)) or self._full(sb)

    def residue(self, sb) -> dict:
        return self.process_residue(sb)

    def footprint(self) -> tuple[str, ...]:
        return (self._tool, f"/run/.remed-{self.id}/")

    def _recover(self, sb) -> None:
        self.kill_tagged(sb)
        self.sh(sb, f"systemctl stop {self.target.service}-debug-logger.service 2>/dev/null; "
                    f"rm -f {self._tool}; true", check=False)
        self._unmount(sb, [self._log])
        self.sh(sb, f"rmdir {shlex.quote(self._log.rsplit('/', 1)[0])} 2>/dev/null; true", check=False)


@register_fault("readonly-fs")
class ReadonlyFs(_FullDisk):
    category = "resource"
    needs = ()
    summary = "the service's data dir is on a read-only mount (as after a filesystem error remounted it ro)"
    defaults = {}

    def _inject(self, sb) -> None:
        d = shlex.quote(self.target.data_dir)
        # A read-only bind of the dir onto itself: the same files, writes refused (EROFS).
        self._redis(sb, "redis-cli -p PORT save >/dev/null")
        self.sh(sb, f"test -d {d} && ! mountpoint -q {d} && mount --bind {d} {d} && mount -o remount,bind,ro {d}")
        self.params["_mounted"] = True
        self._redis(sb, "systemctl restart UNIT; " + _WAIT_PONG)
        self._after_fill(sb)

    def is_active(self, sb) -> bool:
        d = shlex.quote(self.target.data_dir)
        res = self.sh(sb, f"findmnt -no OPTIONS -T {d} | cut -d, -f1", check=False)
        return res.stdout.strip() == "ro"

    def residue(self, sb) -> dict:
        """A read-only mount still at the data dir, read from the node's mount table on the
        host: one hidden under a fresh filesystem mounted over it counts."""
        from e2e_reme.simulators.sandbox import hostview
        if not hostview.supported(sb):
            return {}
        pid = hostview.init_pid(sb, self.node)
        mounts = hostview.mounts_at(pid, self.target.data_dir) if pid else []
        ro = [m for m in mounts if "ro" in m["options"].split(",")]
        if not ro:
            return {}
        return {"readonly_mount": ro[0], "mounts_at_data_dir": len(mounts),
                **({"mask": "a filesystem was mounted over the read-only one"} if mounts[-1] not in ro else {})}

    def _recover(self, sb) -> None:
        if not self.params.get("_mounted"):
            return
        d = shlex.quote(self.target.data_dir)
        self._redis(sb, "redis-cli -p PORT save >/dev/null 2>&1")
        self.sh(sb, f"mountpoint -q {d} && umount {d} 2>/dev/null || umount -l {d} 2>/dev/null; true", check=False)
        self._redis(sb, _REDIS_RESTART)

