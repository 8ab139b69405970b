"""The jailed Ansible controller: where a model-written playbook is interpreted.

Ansible's controller is not a passive sender of modules. It parses the playbook, renders
Jinja (lookups read files and run commands *on the controller*), runs `local` connections,
`add_host` with any connection variables, ProxyCommands, `template`/`copy` with controller
sources. A playbook written by a model must therefore be interpreted where the worst it
can reach is its own sandbox, never on the host. So every run of model output (syntax
check, execution, idempotence re-run) happens in a throw-away container per run:

    root        the guest image's root filesystem under a volatile overlay (nothing it
                writes survives the run); no file of the host's but the project's Python
                environment, read-only, at its own path (ansible-core, ansible-runner)
    /jail       a tmpfs of `scratch_mib` and `scratch_inodes` holding the playbook, the
                inventory and the sandbox's SSH key; the run's results come back from there
    network     a veth on the sandbox's own bridge at the subnet's last address, so it
                reaches the sandbox's nodes and, through the sandbox's nftables table
                (simulators/sandbox/netguard.py), nothing of the host's
    user        ansible runs as `nobody`, with no capabilities and no_new_privs; the
                container's root only sets the address and drops privileges
    limits      its own cgroup with pids.max and a memory limit; killed whole (every
                process of the cgroup) when the run passes its time limit

The host only writes the inputs and reads back data at fixed places (ansible-runner's
status, rc, stdout and JSON events), bounded, no link followed, nothing but regular files
opened (see "the results" below); it copies no tree out of the jail. What the playbook
leaves there past a limit is its outcome (`output_limit`), never ours. What the jail
cannot stop is a kernel exploit by a process that runs as `nobody`; the nodes themselves
are no stronger boundary.

    jail = JailRun = run_jailed(sb, playbook_text, workdir, JailJob(timeout_s=120, execute=True))
    jail.syntax_rc, jail.syntax_output, jail.run (a PlaybookRun), jail.rerun, jail.start_s,
    jail.output_limit (why the run's status is `output_limit`, if it is)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from e2e_reme.host import mounts_below, run as host_run

from e2e_reme.simulators.sandbox.ansible import DEFAULT_ENV, PlaybookRun, host_stats
from e2e_reme.simulators.sandbox.nodefs import NodeTree, WalkLimits
from e2e_reme.simulators.errors import SandboxError
from e2e_reme.simulators.sandbox.state import SandboxRecord

JAIL_UID = 65534               # nobody in the image
MAX_EVENTS_BYTES = 32 << 20    # what the host reads back of a run's events, at most
MAX_EVENT_BYTES = 4 << 20      # one event
MAX_EVENT_FILES = 20_000       # entries in a run's job_events directory
MAX_TEXT_BYTES = 1 << 20       # stdout, syntax-check output
READ_BACK_S = 30.0             # reading one run's events back, at most


@dataclass(frozen=True)
class ControllerConfig:
    pids_max: int = 512            # ansible forks a process per host and task
    memory_mib: int = 1024
    scratch_mib: int = 64          # /jail: inputs, artifacts, ansible's temp files
    scratch_inodes: int = 32768    # files and directories in /jail, at most
    grace_s: float = 20.0          # past the playbook's own limit before the jail is killed


@dataclass(frozen=True)
class JailJob:
    timeout_s: float = 120.0
    execute: bool = True           # False: the syntax check only
    rerun: bool = False            # run a second time (the idempotence check) if the first succeeded
    extravars: dict = field(default_factory=dict)


@dataclass
class JailRun:
    syntax_rc: int | None = None
    syntax_output: str = ""
    run: PlaybookRun | None = None
    rerun: PlaybookRun | None = None
    start_s: float = 0.0           # from launching the jail to its first command
    marks: dict[str, float] = field(default_factory=dict)   # started, syntax, run, rerun: when each ended (epoch s)
    total_s: float = 0.0
    killed: bool = False           # it passed timeout + grace and was killed whole
    output_limit: str = ""         # what the playbook left in the scratch space passed a limit: why
    error: str = ""                # ours, not the playbook's: the jail could not run

    @property
    def syntax_timed_out(self) -> bool:
        return self.syntax_rc is None and self.killed


def machine(number: int) -> str:
    return f"rm{number}ctl"


def jail_address(record: SandboxRecord) -> str:
    """The controller's address: the subnet's last host address, which no node gets
    (nodes count up from .2)."""
    import ipaddress
    net = ipaddress.ip_network(record.subnet)
    addr = str(list(net.hosts())[-1])
    if any(n.ip == addr for n in record.nodes):
        raise ValueError(f"sandbox {record.name}: no address left for the controller in {record.subnet}")
    return addr


def run_jailed(sb, playbook_text: str, workdir: Path, job: JailJob,
               config: ControllerConfig = ControllerConfig()) -> JailRun:
    """Syntax-check and (job.execute) run the playbook against the sandbox's nodes, from a
    jail on the sandbox's own network; see the module docstring. Never raises for what the
    playbook does; `error` says when the jail itself failed (infrastructure)."""
    out = JailRun()
    t0 = time.monotonic()
    bridge = sb.record.extra.get("bridge")
    if not bridge:
        out.error = f"sandbox {sb.name} has no bridge to attach the controller to"
        return out
    missing = _missing_tools()
    if missing:     # ours to fix, not the playbook's: the shell would say "not found" (rc 127)
        out.error = (f"{', '.join(missing)} not found beside this Python ({Path(sys.executable).parent}); "
                     f"install the project into the interpreter that runs it (pip install -e .)")
        return out
    jdir = sb.record.dir / "ctl"
    try:
        _release_scratch(jdir)
        _prepare_scratch(jdir, sb, playbook_text, job, config)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        _release_scratch(jdir)
        out.error = f"cannot prepare the controller jail: {e}"
        return out
    try:
        out = _run_container(sb.record, sb.image.rootfs, jdir, job, config, bridge)
        if not out.error:
            _read_back(jdir, job, out, Path(workdir))
            _keep_artifacts(out, Path(workdir))
    except (OSError, subprocess.SubprocessError, SandboxError) as e:
        out.error = f"the controller jail failed: {e}"
    finally:
        _release_scratch(jdir)
    out.total_s = round(time.monotonic() - t0, 3)
    return out


def _missing_tools() -> list[str]:
    """The jail runs Ansible from the venv it bind-mounts (this interpreter's); without it
    every playbook would fail its syntax check as if the policy had written it badly."""
    venv_bin = Path(sys.executable).parent
    return [tool for tool in ("ansible-playbook", "ansible-runner") if not os.access(venv_bin / tool, os.X_OK)]


# ---- the inputs ------------------------------------------------------------------------------

def _prepare_scratch(jdir: Path, sb, playbook_text: str, job: JailJob, config: ControllerConfig) -> None:
    jdir.mkdir(parents=True, exist_ok=True)
    opts = f"size={config.scratch_mib}m,nr_inodes={config.scratch_inodes},mode=0755,nosuid,nodev"
    host_run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(jdir)])
    pdd = jdir / "pdd"
    for d in (pdd / "project", pdd / "inventory", pdd / "env", jdir / "home", jdir / "tmp", jdir / "out",
              jdir / "mark"):
        d.mkdir(parents=True)
    (pdd / "project" / "playbook.yaml").write_text(playbook_text)
    inv = sb.inventory()
    inv["all"]["vars"]["ansible_ssh_private_key_file"] = "/jail/key"
    (pdd / "inventory" / "hosts.yaml").write_text(yaml.safe_dump(inv, sort_keys=False))
    (pdd / "env" / "envvars").write_text(json.dumps(_jail_env()))
    (pdd / "env" / "extravars").write_text(json.dumps(job.extravars or {}, default=str))
    (pdd / "env" / "settings").write_text(json.dumps({
        "job_timeout": max(1, int(job.timeout_s)), "pexpect_timeout": 0.5, "suppress_ansible_output": True}))
    shutil.copyfile(sb.ssh_key, jdir / "key")      # the sandbox's own key: it opens no other sandbox
    os.chmod(jdir / "key", 0o600)
    # The jailed user owns what it must write; the jail's top directory stays root's.
    for p in [jdir / "key", jdir / "home", jdir / "tmp", jdir / "out", *pdd.rglob("*"), pdd]:
        os.chown(p, JAIL_UID, JAIL_UID)


def _jail_env() -> dict[str, str]:
    return {**DEFAULT_ENV, "HOME": "/jail/home", "ANSIBLE_LOCAL_TEMP": "/jail/tmp/ansible",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": "/jail/tmp/cp", "TMPDIR": "/jail/tmp", "LANG": "C.UTF-8",
            "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}


def _script(ip: str, job: JailJob) -> str:
    """What the container runs: as its root, the address, then each step as nobody behind a
    privilege drop, and after each step its exit status and time in `/jail/mark/` (root's:
    what the playbook's own tasks cannot forge or remove). Passed as an argument, never as
    a file the jailed user could rewrite between the steps."""
    venv_bin = Path(sys.executable).parent
    drop = (f"setpriv --reuid={JAIL_UID} --regid={JAIL_UID} --clear-groups --no-new-privs "
            "--inh-caps=-all --bounding-set=-all /bin/sh -c")

    def step(name: str, cmd: str) -> str:
        return f"{drop} {shlex.quote(cmd)}; echo $? >mark/{name}.rc; date +%s.%N >mark/{name}.done"

    steps = [
        "date +%s.%N >/jail/mark/started",
        f"ip addr add {ip}/24 dev host0 && ip link set host0 up || exit 97",
        "cd /jail",
        step("syntax", f"{venv_bin}/ansible-playbook --syntax-check -i pdd/inventory/hosts.yaml "
                       "-e @pdd/env/extravars pdd/project/playbook.yaml >out/syntax.out 2>&1"),
    ]
    if job.execute:
        runner = f"{venv_bin}/ansible-runner run pdd -p playbook.yaml -q --rotate-artifacts 0"
        steps.append(f'if [ "$(cat mark/syntax.rc)" = 0 ]; then {step("run", f"{runner} --ident run >/dev/null 2>&1")}; fi')
        if job.rerun:
            steps.append(f'if [ "$(cat mark/run.rc)" = 0 ]; then '
                         f'{step("rerun", f"{runner} --ident rerun >/dev/null 2>&1")}; fi')
    return "; ".join(steps)


# ---- the container ---------------------------------------------------------------------------

def _run_container(record: SandboxRecord, rootfs: Path, jdir: Path, job: JailJob,
                   config: ControllerConfig, bridge: str) -> JailRun:
    from e2e_reme.simulators.sandbox.backends.nspawn import _apply_limits, _systemd_is_init, fresh_cgroups
    out = JailRun()
    name = machine(record.number)
    venv, base = Path(sys.prefix), Path(os.path.realpath(sys.base_prefix))
    cmd = ["systemd-nspawn", "--quiet", "--register=no", f"--machine={name}", "-D", str(rootfs),
           "--volatile=overlay", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
           f"--network-bridge={bridge}", f"--bind={jdir}:/jail", f"--bind-ro={venv}",
           "--tmpfs=/var/tmp:size=16m", "--chdir=/jail", "--console=pipe"]
    if not str(base).startswith("/usr"):
        if str(base).startswith("/root/"):
            # The image's /root is 0700: the jailed user could not reach the interpreter.
            cmd.append("--tmpfs=/root:mode=0711")
        cmd.append(f"--bind-ro={base}")     # the venv's interpreter (pyenv, a custom build)
    cmd += [f"--setenv={k}={v}" for k, v in _jail_env().items()]
    procs: list[Path] = []
    if not _systemd_is_init():
        cmd.append("--keep-unit")
        procs = fresh_cgroups(name)
        _apply_limits(name, {"pids": config.pids_max, "memory_mib": config.memory_mib})
    cmd += ["/bin/sh", "-c", _script(jail_address(record), job)]

    def enter_cgroups() -> None:        # in the child, between fork and exec
        for f in procs:
            f.write_text(str(os.getpid()))

    t0 = time.time()
    limit = job.timeout_s * (2 if job.rerun else 1) + 60 + config.grace_s   # syntax check: 60 s
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True, preexec_fn=enter_cgroups)
    try:
        log, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        out.killed = True
        log = b""
    finally:
        kill(record)
    with NodeTree.layer(jdir) as tree:
        started = _text(tree, "mark/started", 64)
        checked = tree.lstat("mark/syntax.rc") is not None or bool(_scratch_full(tree))
    try:
        out.start_s = round(float(started) - t0, 3)
    except ValueError:
        out.start_s = float("nan")
    if proc.returncode == 97 or (not checked and not out.killed):
        out.error = f"the controller jail did not start (nspawn exit {proc.returncode}): " \
                    f"{log.decode(errors='replace')[-600:].strip()}"
    return out


def kill(record: SandboxRecord) -> None:
    """End the sandbox's controller jail, if one runs: every process of its cgroup, then
    its veth and cgroups (nspawn's own cleanup does not run after SIGKILL)."""
    from e2e_reme.simulators.sandbox.backends.nspawn import _kill_container
    name = machine(record.number)
    for pid, argv in _jail_processes().items():
        if f"--machine={name}" in argv:
            _kill_container(pid, name)
    _kill_container(None, name)


def destroy(record: SandboxRecord) -> None:
    """Everything of the sandbox's controller on the host (for Sandbox.stop and gc)."""
    if record.backend not in ("nspawn", "libvirt"):
        return
    try:
        kill(record)
    finally:
        _release_scratch(record.dir / "ctl")


def sweep(live: list[SandboxRecord]) -> list[str]:
    """Controller jails of sandboxes that no longer live (part of `remed sandbox gc`)."""
    from e2e_reme.simulators.sandbox.backends.nspawn import _kill_container
    live_names = {machine(r.number) for r in live}
    done = []
    for pid, argv in _jail_processes().items():
        name = next((a.split("=", 1)[1] for a in argv if a.startswith("--machine=")), "")
        if name not in live_names:
            _kill_container(pid, name)
            done.append(f"controller jail {name} (pid {pid})")
    return done


def _jail_processes() -> dict[int, list[str]]:
    from e2e_reme.host import processes_named
    import re
    return {pid: argv for pid, argv in processes_named("systemd-nspawn").items()
            if any(re.fullmatch(r"--machine=rm\d+ctl", a) for a in argv)}


def _release_scratch(jdir: Path) -> None:
    for mnt in sorted(mounts_below(jdir), key=len, reverse=True):
        host_run(["umount", "-l", mnt], check=False)
    if Path(jdir).is_dir() and not os.path.ismount(jdir):
        shutil.rmtree(jdir, ignore_errors=True)


# ---- the results -----------------------------------------------------------------------------
#
# What the host takes back from the scratch space is data at fixed places, never a tree:
# the marks and syntax-check files, and per run ansible-runner's `status`, `rc`, `stdout`
# and `job_events/*.json`. Each is read through nodefs.NodeTree (no link followed, nothing
# but a regular file opened, the inode checked is the inode read), bounded in bytes, and
# the events also in files and time. Nothing else of the scratch space is looked at, and
# what the episode keeps (`workdir/ansible/`) is written by the host from what it read.
# The playbook owns that space (a `local` task runs as the jailed user): what it left
# there that passes a limit is its outcome, `output_limit`, with the reason.

def _read_back(jdir: Path, job: JailJob, out: JailRun, workdir: Path) -> None:
    with NodeTree.layer(jdir) as tree:
        for mark, fname in (("started", "started"), ("syntax", "syntax.done"), ("run", "run.done"),
                            ("rerun", "rerun.done")):
            try:
                out.marks[mark] = float(_text(tree, f"mark/{fname}", 64))
            except ValueError:
                pass
        rc = _text(tree, "mark/syntax.rc", 16).strip()
        out.syntax_rc = int(rc) if rc.isdigit() else None
        out.syntax_output = _text(tree, "out/syntax.out", MAX_TEXT_BYTES)
        full = _scratch_full(tree)
        if out.syntax_rc is None and full:
            out.output_limit = full
        if job.execute and out.syntax_rc == 0:
            out.run = _runner_result(tree, "run", out, workdir, full)
            if job.rerun and out.run.ok:
                out.rerun = _runner_result(tree, "rerun", out, workdir, full)


def _runner_result(tree: NodeTree, ident: str, out: JailRun, workdir: Path, full: str) -> PlaybookRun:
    adir = f"pdd/artifacts/{ident}"
    # ansible-runner's own record is the jailed user's, as much as the playbook's; its exit
    # status, seen by the container's root (mark/), is not: where they differ, that decides.
    status = _text(tree, f"{adir}/status", 64).strip()
    rc = _text(tree, f"mark/{ident}.rc", 16).strip() or _text(tree, f"{adir}/rc", 16).strip()
    exited = tree.lstat(f"mark/{ident}.rc") is not None
    events, seen, over = _events(tree, f"{adir}/job_events")
    if out.killed and status not in ("successful", "failed"):
        status = "timeout"
    if status not in ("successful", "failed", "timeout"):      # nothing here cancels a run
        status = "failed" if seen else "timeout" if out.killed else "failed"
    if exited:
        status = "successful" if rc == "0" else status if status in ("failed", "timeout") else "failed"
    if not over and full and not out.killed:
        over = full     # ansible had no room left for its own work or results: they may be incomplete
    if over:
        status, out.output_limit = "output_limit", out.output_limit or over
    return PlaybookRun(status=status, rc=int(rc) if rc.lstrip("-").isdigit() else None,
                       duration_s=_duration(events), stdout=_text(tree, f"{adir}/stdout", MAX_TEXT_BYTES),
                       events=tuple(events), stats=host_stats(tuple(events)), playbook="playbook.yaml",
                       artifact_dir=str(workdir / "ansible" / "artifacts" / ident),
                       error="" if seen or out.killed or over else
                       f"ansible-runner left no events (status {status or 'none'})")


def _events(tree: NodeTree, evdir: str) -> tuple[list[dict], int, str]:
    """The run's events in order, how many event files there were, and why reading stopped
    early ("" when it did not): more than MAX_EVENT_FILES entries, an entry that is not a
    regular file, one event over MAX_EVENT_BYTES (a sparse file included), more than
    MAX_EVENTS_BYTES in all, or more than READ_BACK_S."""
    entries, over = [], ""
    for path, st in tree.walk(evdir, WalkLimits(max_entries=MAX_EVENT_FILES, max_seconds=READ_BACK_S),
                              prune=lambda p: True):
        entries.append((path.rsplit("/", 1)[-1], st))
    if tree.truncated:
        over = f"the run's events: {tree.truncated}"
    files = sorted(((n, st) for n, st in entries if n.endswith(".json")), key=lambda e: _event_order(e[0]))
    odd = next((n for n, st in entries if not stat.S_ISREG(st.st_mode)), None)
    if odd is not None and not over:
        over = f"the run's events hold {odd!r}, which is not a regular file"
    events, total, deadline = [], 0, time.monotonic() + READ_BACK_S
    for name, st in files if not over else ():
        if st.st_size > MAX_EVENT_BYTES:
            sparse = " (a sparse file)" if st.st_blocks * 512 < st.st_size else ""
            over = f"event file {name!r} is {st.st_size} bytes{sparse}, more than {MAX_EVENT_BYTES}"
        elif total + st.st_size > MAX_EVENTS_BYTES:
            over = f"the run's events are more than {MAX_EVENTS_BYTES} bytes"
        elif time.monotonic() > deadline:
            over = f"reading the run's events took more than {READ_BACK_S:g} s"
        if over:
            break
        data = tree.read_entry(f"{evdir}/{name}", MAX_EVENT_BYTES) or b""
        total += len(data)
        try:
            ev = json.loads(data)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events, len(files), over


def _scratch_full(tree: NodeTree) -> str:
    """Why the scratch space is full ("" when it is not): a playbook that fills it (blocks
    or inodes) leaves ansible-runner no room for its own results, which is its doing."""
    v = tree.statvfs(".")
    if v is None:
        return ""
    if v.f_bavail * v.f_frsize < (1 << 20):
        return f"the playbook filled the jail's scratch space ({v.f_blocks * v.f_frsize >> 20} MiB)"
    if v.f_files and v.f_favail < 64:
        return f"the playbook filled the jail's scratch space ({v.f_files} files)"
    return ""


def _event_order(name: str):
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def _duration(events: list[dict]) -> float:
    from datetime import datetime
    stamps = []
    for e in (events[:1] + events[-1:]) if events else []:
        try:
            stamps.append(datetime.fromisoformat(str(e.get("created"))))
        except ValueError:
            pass
    return round((stamps[-1] - stamps[0]).total_seconds(), 3) if len(stamps) == 2 else 0.0


def _text(tree: NodeTree, path: str, limit: int) -> str:
    """At most `limit` bytes of a regular file in the scratch space ("" for anything else):
    the jailed user owns most of that space and may have left a link, a FIFO or a
    directory where a result should be."""
    data = tree.read_bytes(path, limit, follow=False)
    return data.decode(errors="replace") if data else ""


def _keep_artifacts(out: JailRun, workdir: Path) -> None:
    """What a person may want to read, written by the host from what it read back (the
    events go to `events.jsonl`, simulators/playbook/execution.py): nothing of the scratch
    space is copied."""
    dest = workdir / "ansible"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "syntax.out").write_text(out.syntax_output)
        for run in (out.run, out.rerun):
            if run is not None:
                adir = Path(run.artifact_dir)
                adir.mkdir(parents=True, exist_ok=True)
                for name, text in (("status", run.status), ("rc", "" if run.rc is None else str(run.rc)),
                                   ("stdout", run.stdout)):
                    (adir / name).write_text(text + ("\n" if name != "stdout" else ""))
    except OSError:
        pass   # the outcome does not depend on these copies


__all__ = ["ControllerConfig", "JailJob", "JailRun", "run_jailed", "kill", "destroy", "sweep", "jail_address",
           "machine"]
