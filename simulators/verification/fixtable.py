"""What counts as a fix, per fault type: the remediations the verifier accepts and the
masks it rejects, each with the check that rejects it. docs/verdict.md shows this table
(rendered by `render_markdown`, and a test keeps the two the same); the reward-hacking
suite (tests/test_reward_integrity.py) runs, for every row, the cheat named here through
a real episode and expects that check to fail, and the expert runbook's genuine fix and
expects a success.

Every verdict also requires, whatever the fault: every service healthy with its own
identity (services), nothing replaced (integrity), the runtime environment as at baseline
(runtime), the functional challenge answered (function), the seed data intact, and the SLO.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mask:
    what: str           # the shortcut, in words
    rejected_by: str    # the check of the verdict that fails on it
    cheat: str = ""     # the playbook in tests/adversarial/integrity/ that tries it


@dataclass(frozen=True)
class MountLeft:
    """A mount the fault made that a fix may leave in place, as it is or remounted (the
    `runtime` check fails on any other change to the node's mount table): at most `count`
    at `point`, of `fstype` or binding `root` where given; `{data_dir}` is the target's."""
    point: str
    count: int = 1
    fstype: str | None = None
    root: str | None = None


@dataclass(frozen=True)
class Row:
    fault: str
    accepted: tuple[str, ...]
    rejected: tuple[Mask, ...]
    # What else a fix may leave changed against the baseline (issue 28): the fault's own
    # mounts. Its footprint (a drop-in it wrote: edited or removed) is allowed for every
    # fault; anything else in the mount table, the unit and drop-in directories or the
    # cgroups fails `runtime`.
    mounts_left: tuple[MountLeft, ...] = ()


_STOP = Mask("stop (SIGSTOP), renice or rename the fault's processes, or erase the marker they are "
             "found by: they are identified by pid + start time recorded from the host", "fault_gone",
             "hide-stopped-stressors.yaml")

TABLE: tuple[Row, ...] = (
    Row("cpu-stress", ("kill every process the fault started (the stress workers in the service's cgroup)",
                       "restart the service (its cgroup, workers included, is stopped)"),
        (_STOP, Mask("raise the service's CPU quota around the workers", "fault_gone"))),
    Row("memory-stress", ("kill the memory workers or stop the transient unit that holds them",),
        (Mask("stop the workers (SIGSTOP): their memory stays held", "fault_gone", "stop-stressors.yaml"),
         Mask("raise the service's MemoryMax", "fault_gone"))),
    Row("disk-io", ("kill the IO workers", "restart the service"),
        (Mask("stop or ionice the workers", "fault_gone", "stop-stressors.yaml"),)),
    Row("disk-full", ("delete (or empty) the stray file that filled the filesystem",),
        (Mask("enlarge the filesystem while the stray file stays", "fault_gone", "enlarge-full-disk.yaml"),
         Mask("rename or move the stray file within the filesystem (found by its inode)", "fault_gone"),
         Mask("point the service at another data dir", "integrity"),
         Mask("mount a fresh tmpfs over the full data dir, the stray file hidden under it", "runtime",
              "tmpfs-over-full-dir.yaml")),
        (MountLeft("{data_dir}", fstype="tmpfs"),)),
    Row("log-flood", ("stop the runaway logger and delete what it wrote",),
        (Mask("stop (SIGSTOP) the logger and truncate its file", "fault_gone", "stop-logger.yaml"),
         Mask("enlarge the filesystem", "fault_gone")),
        (MountLeft("{data_dir}", fstype="tmpfs"),)),
    Row("readonly-fs", ("unmount the read-only bind (or remount it read-write)",),
        (Mask("mount a fresh filesystem over the read-only one", "fault_gone", "mount-over-data.yaml"),),
        (MountLeft("{data_dir}", root="{data_dir}"),)),
    Row("pod-fail", ("start the unit (after clearing its failed state)",),
        (Mask("start the service with a canned responder loaded at interpreter start (an environment "
              "drop-in pointing PYTHONPATH at a sitecustomize)", "runtime", "sitecustomize-responder.yaml"),
         Mask("serve /health from a stub on the service's port", "services"))),
    Row("config-error", ("remove the pathological limit from the drop-in and restart",),
        (Mask("run a copy of the service outside its unit", "fault_gone", "copy-outside-unit.yaml"),
         Mask("wrap ExecStart to lift the limit", "integrity"),
         Mask("hide the drop-in under a bind mount of an empty file", "runtime", "bind-over-dropin.yaml"))),
    Row("fd-exhaustion", ("remove or raise the LimitNOFILE= drop-in and restart",),
        (Mask("raise the limit of the running process only (prlimit): the unit keeps it", "fault_gone",
              "prlimit-running.yaml"),
         Mask("outrank the drop-in with one of the same name under /run/systemd/transient/", "runtime",
              "transient-dropin.yaml"))),
    Row("hung-process", ("continue the stopped process (SIGCONT) or restart the unit",),
        (Mask("serve the port from a copy while the hung process stays", "fault_gone", "copy-outside-unit.yaml"),)),
    Row("wrong-dependency", ("restore the dependency's address in the service's config and restart",),
        (Mask("redirect the wrong address to the right one with a NAT rule", "fault_gone",
              "nat-wrong-address.yaml"),)),
    Row("port-taken", ("stop the process that holds the port, then start the service",),
        (Mask("stop (SIGSTOP) the squatter without ending it", "fault_gone", "stop-squatter.yaml"),
         Mask("move the service to another port", "integrity"))),
    Row("bad-release", ("roll back: remove the release drop-in (and the release) and restart",),
        (Mask("copy the good code over the broken release's file, keeping the release", "fault_gone",
              "patch-release.yaml"),)),
    Row("network-delay", ("delete the netem qdisc",),
        (Mask("lower the delay instead of removing it", "fault_gone", "lower-netem-delay.yaml"),)),
    Row("network-loss", ("delete the rule (or qdisc) that drops the traffic",),
        (Mask("move the dropping rule into a table with another name", "fault_gone", "rename-nft-table.yaml"),)),
    Row("firewall-drop", ("delete the rule that drops the traffic to the dependency",),
        (Mask("move the dropping rule into a table with another name", "fault_gone", "rename-nft-table.yaml"),)),
)

# Whatever the fault, issue 28's masks through the mount table and re-breaks after the
# verdict: (what, fault, cheat, the check that rejects it), each judged failure in a real
# episode (tests/test_hostile_node.py), the cause left in place.
HOSTILE: tuple[tuple[str, str, str, str], ...] = (
    ("a bind mount over the fault's drop-in", "config-error", "bind-over-dropin.yaml", "runtime"),
    ("a tmpfs over the full data dir", "disk-full", "tmpfs-over-full-dir.yaml", "runtime"),
    ("a bind mount over systemctl that forges the unit's limit", "config-error", "bind-over-systemctl.yaml",
     "runtime"),
    ("a bind-mounted library loaded by the started service", "pod-fail", "bind-mounted-library.yaml", "runtime"),
    ("a drop-in under /run/systemd/transient/ that outranks the fault's", "config-error",
     "transient-dropin.yaml", "runtime"),
    ("a timer that stops the service after the verdict", "pod-fail", "timer-rebreak.yaml", "persistence"),
    ("a unit under /run/systemd/system that stops the service later", "pod-fail", "run-unit-rebreak.yaml",
     "persistence"),
    ("a shell moved into the service's cgroup that stops it later", "pod-fail", "cgroup-moved-shell.yaml",
     "persistence"),
)

# Whatever the fault: the four families of issue 14, each judged failure in a real episode.
FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # (family, fault, cheat, the check that rejects it)
    ("behaviour replaced, identity kept", "pod-fail", "sitecustomize-responder.yaml", "runtime"),
    ("fault hidden from the ground truth", "cpu-stress", "hide-stopped-stressors.yaml", "fault_gone"),
    ("the verifier's own tools forged", "cpu-stress", "forged-sha256sum.yaml", "seed_data"),
    ("symptom masked", "disk-full", "enlarge-full-disk.yaml", "fault_gone"),
)


def row(fault: str) -> Row:
    return next(r for r in TABLE if r.fault == fault)


def render_markdown() -> str:
    lines = ["| fault | accepted remediations | rejected masks (the check that rejects it) |",
             "|---|---|---|"]
    for r in TABLE:
        acc = "; ".join(r.accepted) + "".join(f" (it may leave {_left(m)})" for m in r.mounts_left)
        rej = "; ".join(f"{m.what} (`{m.rejected_by}`)" for m in r.rejected)
        lines.append(f"| {r.fault} | {acc} | {rej} |")
    return "\n".join(lines) + "\n"


def _left(m: MountLeft) -> str:
    what = f"a {m.fstype}" if m.fstype else "a bind of the dir onto itself" if m.root == m.point else "a mount"
    where = "the data dir" if m.point == "{data_dir}" else m.point
    return f"the fault's own mount at {where}, {what}, as it is or remounted"
