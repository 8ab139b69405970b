"""One long-lived Ray actor per host: it owns that host's sandboxes and runs episodes on them.

    Host = ray.remote(SandboxHost)
    host = Host.options(resources={"sandbox_host": 1}, num_cpus=0, max_concurrency=64).remote(HostConfig())
    ray.get(host.ready.remote())          # image found (or built), slots deployed and checkpointed
    rec = ray.get(host.run.remote(job))   # one episode on a free slot -> its record, as a dict

A host keeps a pool of *slots*, each a sandbox with a system deployed, healthy and
checkpointed (`simulators.episode.Slot`), so an episode starts with a reset to that
deployment, never with a deploy. The pool is sized from the host (cores, available memory)
and the config's cap (`plan_slots`). `run` takes an idle slot of the job's system (or
redeploys an idle one for it), runs the episode with `run_case` (an infrastructure failure
replaces the sandbox and retries once) and gives the slot back. The driver (`Fleet`) never
sends more jobs than a host has slots, so `run` does not queue in practice.

Records are exactly the episode runner's (`EpisodeRecord.to_dict()`, one schema) with one
key added, `host`: where the episode ran. Episode directories stay on this host, under
`HostConfig.out_dir`.

Lifetimes: the sandboxes belong to this actor's process. `shutdown()` stops them; if the
process dies instead (killed, its node lost, the driver gone), each sandbox's reaper
destroys it, and `remed sandbox gc` is the backstop. A restarted actor (Ray's
`max_restarts`) starts with no slots and gets new sandboxes, under new names, on `ready()`.

Metrics (Ray's, exported to Prometheus by each node's metrics agent):
    remed_fleet_episodes{host,outcome}        counter
    remed_fleet_slots{host,state}             gauge: busy, idle, down
    remed_fleet_phase_seconds{host,phase}     histogram of episode phase times
    remed_fleet_sandbox_replacements{host}    counter
and `stats()` gives the same figures as data for the CLI's live summary.
"""

from __future__ import annotations

import collections
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2e_reme.simulators.episode import EpisodeConfig, EpisodeRecord, Scenario, Slot, run_case

from .errors import HostStartFailed

PHASE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]


@dataclass(frozen=True)
class HostConfig:
    backend: str = "nspawn"
    systems: tuple[str, ...] = ("simple-micro",)   # slots are deployed with these, round robin
    slots: int | None = None             # None: sized from the host by plan_slots
    max_slots: int = 4
    cores_per_slot: float = 0.5          # an idle deployment needs little; an episode's stress more
    memory_per_slot_mib: int = 768       # boutique's 12 services with a memory-stress worker fit
    out_dir: str = ""                    # episode directories on the host; "" = <state>/fleet/episodes
    keep_episode_dirs: bool = True       # False: drop them once the record is returned
    sandbox_prefix: str = "fl"           # sandboxes are <prefix><pid>-<slot>
    episode: EpisodeConfig = EpisodeConfig()


@dataclass(frozen=True)
class Job:
    """One episode to run: a scenario and who remediates it. A `completion` (a model's
    answer sampled elsewhere, with its token ids if known) is judged as the answer of
    `policy`, which then only names it; `id` names the record."""

    id: str
    scenario: Scenario
    policy: str = "runbook"
    policy_options: dict = field(default_factory=dict)
    completion: str | None = None
    completion_ids: tuple[int, ...] | None = None
    requeues: int = 0                    # times a lost host gave it back
    group: Any = None                    # judge.Group: observe, answer and judge a group on one slot
                                         # (cluster/judge.py run_group); its result is not a record


def available_memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def plan_slots(config: HostConfig, cores: int | None = None, memory_mib: int | None = None) -> tuple[int, str]:
    """How many sandboxes this host keeps, and why that many."""
    if config.slots:
        return int(config.slots), f"{config.slots} (configured)"
    cores = cores or os.cpu_count() or 1
    memory_mib = available_memory_mib() if memory_mib is None else memory_mib
    by_cpu = int(cores / config.cores_per_slot)
    by_mem = int(memory_mib / config.memory_per_slot_mib)
    n = max(1, min(config.max_slots, by_cpu, by_mem))
    return n, (f"{n} = min(max_slots {config.max_slots}, {cores} cores / {config.cores_per_slot:g}, "
               f"{memory_mib} MiB available / {config.memory_per_slot_mib})")


class _Metrics:
    """Ray's metrics where the runtime offers them; a no-op elsewhere (a plain process)."""

    def __init__(self, host: str):
        self.host = host
        try:
            from ray.util import metrics
            self.episodes = metrics.Counter("remed_fleet_episodes", "Episodes finished, by outcome.",
                                            tag_keys=("host", "outcome"))
            self.slots = metrics.Gauge("remed_fleet_slots", "Sandbox slots by state.", tag_keys=("host", "state"))
            self.phases = metrics.Histogram("remed_fleet_phase_seconds", "Episode phase durations.",
                                            boundaries=PHASE_BUCKETS, tag_keys=("host", "phase"))
            self.replacements = metrics.Counter("remed_fleet_sandbox_replacements",
                                                "Sandboxes destroyed and replaced.", tag_keys=("host",))
        except Exception:
            self.episodes = self.slots = self.phases = self.replacements = None

    def episode(self, rec: dict) -> None:
        if self.episodes is None:
            return
        self.episodes.inc(1, tags={"host": self.host, "outcome": rec["outcome"]})
        for phase, s in rec.get("timings", {}).items():
            self.phases.observe(float(s), tags={"host": self.host, "phase": phase})

    def slot_states(self, busy: int, idle: int, down: int) -> None:
        if self.slots is None:
            return
        for state, n in (("busy", busy), ("idle", idle), ("down", down)):
            self.slots.set(n, tags={"host": self.host, "state": state})

    def replaced(self) -> None:
        if self.replacements is not None:
            self.replacements.inc(1, tags={"host": self.host})


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))], 3)
    return {"p50": round(statistics.median(s), 3), "p90": q(0.9), "max": round(s[-1], 3), "n": len(s)}


class SandboxHost:
    """See the module docstring. Plain Python: Ray makes it an actor (`ray.remote`)."""

    def __init__(self, config: HostConfig = HostConfig()):
        # Ray starts workers at nice 15. Sandboxes inherit it from the actor, and an episode
        # judged through the fleet would then see slower services (and other SLO verdicts)
        # than the same episode run by `remed bench`.
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            pass    # not root: the episodes still run, at the worker's priority
        self.config = config
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.node_id = _node_id()
        self.n_slots, self.sizing = plan_slots(config)
        self.out_dir = Path(config.out_dir) if config.out_dir else _default_out()
        self._slots: list[Slot] = []
        self._idle: list[int] = []
        self._busy: dict[int, str] = {}
        self._cond = threading.Condition()
        self._ready_lock = threading.Lock()
        self._policies: dict[tuple, Any] = {}
        self._closed = False
        self._image = ""
        self._metrics = _Metrics(self.hostname)
        self._started = time.time()
        self._outcomes: collections.Counter = collections.Counter()
        self._errors: collections.Counter = collections.Counter()
        self._phases: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=2000))
        self._finished: collections.deque = collections.deque(maxlen=5000)   # finish times
        self._replace_s: list[float] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def ready(self) -> dict:
        """Bring every slot up (idempotent): find or build the image, create the sandboxes,
        deploy, checkpoint. HostStartFailed names what went wrong; no sandbox is left."""
        with self._ready_lock:
            if self._slots:
                return self.info()
            from e2e_reme.vm_images import build_image, find_image
            try:
                image = find_image() or build_image()
            except Exception as e:
                raise HostStartFailed(f"host {self.hostname}: no guest image and building one failed: {e}") from e
            self._image = image.hash
            systems = self.config.systems or ("simple-micro",)
            slots = [Slot(systems[i % len(systems)], backend=self.config.backend, name=self._sandbox_name(i),
                          purpose=self._purpose(i)) for i in range(self.n_slots)]
            errors: list[str] = []

            def up(slot: Slot) -> None:
                try:
                    slot.up()
                except Exception as e:
                    errors.append(f"{slot.name} ({slot.system}): {e}")

            # Side by side: deploying is mostly waiting on SSH and Ansible.
            with ThreadPoolExecutor(max(1, min(4, len(slots)))) as pool:
                list(pool.map(up, slots))
            if errors:
                for s in slots:
                    s.down()
                raise HostStartFailed(f"host {self.hostname}: {len(errors)} of {len(slots)} sandbox(es) did not "
                                      f"come up: {errors[0]}")
            with self._cond:
                self._slots = slots
                self._idle = list(range(len(slots)))
                self._closed = False
            self._gauge()
            return self.info()

    def shutdown(self) -> list[str]:
        """Stop every sandbox of this host (episodes still running on them end as
        infrastructure failures). Returns the names stopped."""
        with self._cond:
            self._closed = True
            slots, self._slots, self._idle = self._slots, [], []
            self._cond.notify_all()
        stopped = []
        for s in slots:
            if s.sb is not None:
                stopped.append(s.sb.name)
            try:
                s.down()
            except Exception:
                pass   # the reaper and `remed sandbox gc` are the backstop
        self._gauge()
        return stopped

    def info(self) -> dict:
        return {"hostname": self.hostname, "node_id": self.node_id, "pid": self.pid, "slots": len(self._slots),
                "sizing": self.sizing, "image": self._image, "backend": self.config.backend,
                "systems": [s.system for s in self._slots],
                "sandboxes": [s.name for s in self._slots]}

    # ---- episodes ---------------------------------------------------------------------------
    def run(self, job: Job) -> dict:
        """Run one job on a free slot; return its record (a dict)."""
        i = self._acquire(job)
        try:
            slot = self._slots[i]
            if slot.system != job.scenario.system:
                self._redeploy(i, job.scenario.system)
                slot = self._slots[i]
            if job.group is not None:
                from .judge import run_group
                where = {"hostname": self.hostname, "node_id": self.node_id, "pid": self.pid, "sandbox": slot.name,
                         "requeues": job.requeues}
                return {**run_group(slot, job, out_dir=self.out_dir, config=self.config.episode,
                                    on_record=lambda d: (d.update(host=where), self._account(d))), "host": where}
            policy = self._policy(i, job)
            reps = slot.replacements
            rec = run_case(slot, job.scenario, policy, out_dir=self.out_dir, config=self.config.episode,
                           episode_id=job.id)
            if slot.replacements > reps:
                self._replace_s.append(slot.up_s)
                self._metrics.replaced()
            d = rec.to_dict()
            d["host"] = {"hostname": self.hostname, "node_id": self.node_id, "pid": self.pid,
                         "sandbox": slot.name, "requeues": job.requeues}
            if not self.config.keep_episode_dirs:
                from e2e_reme.host import safe_rmtree
                safe_rmtree(self.out_dir / job.id)
            self._account(d)
            return d
        finally:
            self._release(i)

    def stats(self) -> dict:
        """What this host has done, as data: slots by state, outcomes, failures by class,
        phase time percentiles, episodes per minute, sandbox replacements."""
        with self._cond:
            busy = len(self._busy)
            idle = sum(1 for i in self._idle if self._slots[i].ready)
            down = len(self._idle) - idle
        now = time.time()
        recent = [t for t in self._finished if now - t <= 300]
        span = min(300.0, now - self._started)
        return {"hostname": self.hostname, "node_id": self.node_id, "pid": self.pid,
                "slots": {"total": len(self._slots), "busy": busy, "idle": idle, "down": down},
                "episodes": sum(self._outcomes.values()), "outcomes": dict(self._outcomes),
                "failures": dict(self._errors),
                "episodes_per_min": round(60 * len(recent) / span, 2) if span > 0 else 0.0,
                "phases": {p: _percentiles(list(v)) for p, v in self._phases.items()},
                "replacements": len(self._replace_s), "replace_s": _percentiles(self._replace_s),
                "uptime_s": round(now - self._started, 1)}

    def kill_sandbox(self, busy_only: bool = True) -> str | None:
        """Destroy one slot's sandbox from under it, as a crashed VM or a lost container
        would be (for fault-tolerance tests and bench/fleet.py). The episode on it, if
        any, fails as infrastructure and is retried on a replacement. Returns its name."""
        with self._cond:
            picks = list(self._busy) if busy_only else [i for i, s in enumerate(self._slots) if s.ready]
            if not picks or not self._slots:
                return None
            slot = self._slots[picks[0]]
            sb = slot.sb
        if sb is None:
            return None
        type(sb).destroy(sb.record)
        return sb.name

    # ---- internals -----------------------------------------------------------------------
    def _sandbox_name(self, i: int) -> str:
        return f"{self.config.sandbox_prefix}{self.pid % 100000}-{i}"

    def _purpose(self, i: int) -> str:
        return f"fleet host {self.hostname} slot {i}"      # what the slot's sandbox lease tells others

    def _acquire(self, job: Job) -> int:
        want = job.scenario.system
        with self._cond:
            while True:
                if self._closed:
                    raise HostStartFailed(f"host {self.hostname} is shut down")
                if not self._slots:
                    raise HostStartFailed(f"host {self.hostname} has no slots: call ready() first")
                if self._idle:
                    same = [i for i in self._idle if self._slots[i].system == want]
                    i = (same or self._idle)[0]
                    self._idle.remove(i)
                    self._busy[i] = job.id
                    break
                self._cond.wait(1.0)
        self._gauge()
        return i

    def _release(self, i: int) -> None:
        with self._cond:
            self._busy.pop(i, None)
            if not self._closed and i < len(self._slots):
                self._idle.append(i)
            self._cond.notify()
        self._gauge()

    def _redeploy(self, i: int, system: str) -> None:
        old = self._slots[i]
        old.down()
        self._slots[i] = Slot(system, backend=self.config.backend, name=old.name, purpose=self._purpose(i))
        self._policies = {k: v for k, v in self._policies.items() if k[0] != i}
        try:
            self._slots[i].up()
        except Exception:
            pass   # left down: run_case tries once more and records why it could not

    def _policy(self, i: int, job: Job):
        if job.completion is not None:
            from e2e_reme.simulators.policies import FixedPolicy
            return FixedPolicy(job.completion, name=job.policy or "fixed",
                               completion_ids=list(job.completion_ids) if job.completion_ids is not None else None)
        import json
        from e2e_reme.simulators.policies import make_policy
        key = (i, job.policy, json.dumps(job.policy_options, sort_keys=True, default=str))
        if key not in self._policies:    # one per slot: model clients are not shared between threads
            self._policies[key] = make_policy(job.policy, **job.policy_options)
        return self._policies[key]

    def _account(self, d: dict) -> None:
        with self._cond:
            self._outcomes[d["outcome"]] += 1
            if d["outcome"] != "success" and d.get("error_class"):
                self._errors[d["error_class"]] += 1
            for p, s in d.get("timings", {}).items():
                self._phases[p].append(float(s))
            self._finished.append(time.time())
        self._metrics.episode(d)

    def _gauge(self) -> None:
        s = self.stats()["slots"] if self._slots else {"busy": 0, "idle": 0, "down": 0}
        self._metrics.slot_states(s["busy"], s["idle"], s["down"])


def lost_record(job: Job, error_class: str, reason: str, config: EpisodeConfig | None = None) -> dict:
    """The record of a job no host could finish (its host was lost too often, or it ran
    past the fleet's episode timeout): an infrastructure failure, counted once."""
    now = time.time()
    rec = EpisodeRecord(id=job.id, scenario=asdict(job.scenario), policy=job.policy, outcome="infra_failure",
                        stage="lost", error_class=error_class, reason=reason,
                        config=asdict(config) if config else {}, started_at=now, finished_at=now)
    d = rec.to_dict()
    d["host"] = {"requeues": job.requeues}
    return d


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


def _default_out() -> Path:
    from e2e_reme import paths
    return paths.state_dir() / "fleet" / "episodes"
