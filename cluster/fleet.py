"""The fleet: the driver's view of every sandbox host of a Ray cluster, turned into one
stream of verified episodes.

    with Fleet(FleetConfig(host=HostConfig(systems=("simple-micro",)))).start() as fleet:
        for rec in fleet.run(jobs):                  # records as they finish, in any order
            ...
        records = fleet.evaluate(scenario, completions)  # G completions, same starting state

Placement: every node that advertises the custom resource `sandbox_host` (`ray start
--resources='{"sandbox_host": 1}'`) gets exactly one `SandboxHost` actor, pinned to that
node; nodes without it (GPU trainers, the head) get none. With no address, `start()` runs a
local Ray (`ray.init`) whose only node is this machine, advertised as a sandbox host.

Scheduling: a host has as many slots as it said in `ready()`; the fleet never sends a host
more jobs than it has free slots (back-pressure: `run` pulls from its iterable only as
slots free up), and it sends a job to the host with the most free slots.

Fault tolerance, where each failure ends up:
- a sandbox that stops answering: the host replaces it and retries the episode once; a
  second failure is the record's `infra_failure` (never a policy failure);
- a host actor that dies: Ray restarts it (`max_restarts`); its in-flight jobs are put back
  in the queue (at most `max_requeues` times each, then recorded as `infra_failure` with
  stage `lost`), the restarted actor is warmed up again before it gets work. The dead
  process's sandboxes are destroyed by their reapers;
- an episode that runs past `episode_timeout_s`: its host is presumed wedged and killed
  (and restarted); the job is requeued like any other lost job.
Every job yields exactly one record: nothing is lost, nothing counted twice.

Shutdown (`shutdown()`, the context manager, Ctrl-C in the CLI) stops every host's
sandboxes and the actors; if the driver dies, Ray ends its actors and the reapers destroy
their sandboxes; `remed sandbox gc` finds anything a SIGKILL of everything left behind.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from e2e_reme.ray_auth import private_token
from e2e_reme.simulators.episode import Scenario

from .errors import HostStartFailed, NoSandboxHosts, RayUnavailable
from .sandbox_host import HostConfig, Job, SandboxHost, lost_record

RESOURCE = "sandbox_host"


@dataclass(frozen=True)
class FleetConfig:
    address: str | None = None          # None: start a local Ray; "auto" or ray://...: join a cluster
    resource: str = RESOURCE            # the custom resource a sandbox host advertises
    host: HostConfig = HostConfig()
    episode_timeout_s: float = 900.0    # a job running longer marks its host as wedged
    max_requeues: int = 2               # a job whose host is lost more often is recorded as lost
    max_restarts: int = 3               # per host actor (Ray restarts it)
    ready_timeout_s: float = 900.0      # image build (if missing) and deploys of a host's slots
    metrics_port: int | None = None     # local Ray: where Prometheus scrapes this node's metrics
    ray_init: dict = field(default_factory=dict)   # extra ray.init() arguments (local Ray only)


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"the fleet needs Ray ({e}); install it: pip install 'ray[default]'") from None
    return ray


class _Host:
    """The driver's bookkeeping for one host actor."""

    def __init__(self, actor, node_id: str, node_ip: str):
        self.actor, self.node_id, self.node_ip = actor, node_id, node_ip
        self.state = "starting"           # starting | ready | restarting | dead
        self.slots = 0
        self.info: dict = {}
        self.inflight: set = set()
        self.ready_ref = None
        self.ready_at = 0.0
        self.lost_at = 0.0
        self.restarts = 0

    @property
    def free(self) -> int:
        return self.slots - len(self.inflight) if self.state == "ready" else 0

    @property
    def name(self) -> str:
        return self.info.get("hostname") or self.node_ip or self.node_id[:8]


class Fleet:
    """See the module docstring."""

    def __init__(self, config: FleetConfig = FleetConfig()):
        self.config = config
        self.hosts: list[_Host] = []
        self._owns_ray = False
        self._started = 0.0
        self.counts: collections.Counter = collections.Counter()   # driver-side: done, requeued, lost, ...

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, progress: Callable[[str], None] | None = None) -> "Fleet":
        say = progress or (lambda s: None)
        ray = _ray()
        if not ray.is_initialized():
            self._init_ray(ray)
        self._started = time.time()
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(self.config.resource, 0) >= 1]
        if not nodes:
            self.shutdown()
            raise NoSandboxHosts(
                f"no node of the Ray cluster advertises the '{self.config.resource}' resource; start sandbox hosts "
                f"with: ray start --address=<head> --resources='{{\"{self.config.resource}\": 1}}'")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        cls = ray.remote(SandboxHost)
        for n in nodes:
            actor = cls.options(
                num_cpus=0, resources={self.config.resource: 1}, max_restarts=self.config.max_restarts,
                max_task_retries=0, max_concurrency=64,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(self.config.host)
            self.hosts.append(_Host(actor, n["NodeID"], n.get("NodeManagerAddress", "")))
        say(f"{len(self.hosts)} sandbox host(s): bringing their slots up")
        try:
            refs = {h.actor.ready.remote(): h for h in self.hosts}
            pending = list(refs)
            deadline = time.monotonic() + self.config.ready_timeout_s
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
                if not done:
                    raise HostStartFailed(f"{len(pending)} sandbox host(s) were not ready after "
                                          f"{self.config.ready_timeout_s:.0f} s")
                h = refs[done[0]]
                try:
                    self._on_ready(h, ray.get(done[0]))
                except ray.exceptions.RayTaskError as e:
                    raise HostStartFailed(_cause(e)) from None
                say(f"host {h.name}: {h.slots} slot(s) ready ({h.info.get('sizing', '')})")
        except BaseException:
            self.shutdown()
            raise
        return self

    def _init_ray(self, ray) -> None:
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                      log_to_driver=False, namespace="e2e-reme")
        # The project's packages must import in the workers: a local Ray inherits this
        # interpreter; a cluster's hosts have the project installed (infra/terraform).
        if self.config.address is None:
            kwargs["resources"] = {self.config.resource: 1}
            if self.config.metrics_port:
                kwargs["_metrics_export_port"] = int(self.config.metrics_port)
            kwargs.update(self.config.ray_init)
            self._owns_ray = True
        else:
            kwargs["address"] = self.config.address
        # A local head would write its token readable by every local user (e2e_reme/ray_auth.py).
        private_token(create=self.config.address is None)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.config.address or "a local Ray"
            raise RayUnavailable(f"cannot start or reach {where}: {e}; for a cluster, start its head with "
                                 f"`ray start --head` and pass --address auto (or ray://HEAD:10001)") from None

    def _on_ready(self, h: _Host, info: dict) -> None:
        h.info, h.slots, h.state, h.ready_ref = info, int(info["slots"]), "ready", None
        h.ready_at = time.monotonic()

    def shutdown(self) -> None:
        """Stop every sandbox of every host, then the actors (and a local Ray we started)."""
        try:
            ray = _ray()
        except RayUnavailable:
            return
        if ray.is_initialized() and self.hosts:
            refs = []
            for h in self.hosts:
                if h.state != "dead":
                    try:
                        refs.append(h.actor.shutdown.remote())
                    except Exception:
                        pass
            if refs:
                try:
                    ray.wait(refs, num_returns=len(refs), timeout=120)
                except Exception:
                    pass
            for h in self.hosts:
                try:
                    ray.kill(h.actor, no_restart=True)
                except Exception:
                    pass
                h.state = "dead"
        self.hosts = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def capacity(self) -> int:
        return sum(h.slots for h in self.hosts if h.state == "ready")

    # ---- running jobs ---------------------------------------------------------------------
    def run(self, jobs: Iterable[Job], *, on_event: Callable[[str, Any], None] | None = None) -> Iterator[dict]:
        """Run every job; yield each one's record as it finishes. Jobs are pulled from the
        iterable only when a slot is free, so it may be a generator of any length."""
        ray = _ray()
        emit = on_event or (lambda kind, payload: None)
        source = iter(jobs)
        queue: collections.deque[Job] = collections.deque()    # requeued jobs go first
        inflight: dict[Any, tuple[_Host, Job, float]] = {}
        exhausted = False

        def next_job() -> Job | None:
            nonlocal exhausted
            if queue:
                return queue.popleft()
            if exhausted:
                return None
            try:
                return next(source)
            except StopIteration:
                exhausted = True
                return None

        while True:
            # Fill every free slot.
            while True:
                h = max((h for h in self.hosts if h.free > 0), key=lambda h: h.free, default=None)
                if h is None:
                    break
                job = next_job()
                if job is None:
                    break
                ref = h.actor.run.remote(job)
                h.inflight.add(ref)
                inflight[ref] = (h, job, time.monotonic())
                emit("dispatch", (h.name, job.id))
            restarting = {h.ready_ref: h for h in self.hosts if h.state == "restarting" and h.ready_ref is not None}
            if not inflight and not restarting:
                if queue or not exhausted:
                    # Work is left and no host can take it: every host is dead.
                    for job in list(queue) + list(source):
                        self.counts["lost"] += 1
                        yield lost_record(job, "NoHostLeft", "every sandbox host of the fleet is gone",
                                          self.config.host.episode)
                    queue.clear()
                return
            done, _ = ray.wait(list(inflight) + list(restarting), num_returns=1, timeout=1.0)
            emit("tick", len(inflight))
            for ref in done:
                if ref in restarting:
                    self._restarted(ray, restarting[ref], emit)
                    continue
                h, job, t0 = inflight.pop(ref)
                h.inflight.discard(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    yield from self._requeue(h, job, queue, f"host {h.name} died: {_cause(e)}", emit)
                    if t0 >= h.ready_at:     # not a late error of an incarnation already replaced
                        self._host_lost(ray, h, emit)
                    continue
                except ray.exceptions.RayTaskError as e:
                    # A bug of ours in the host: recorded, not retried (it would fail again).
                    self.counts["host_errors"] += 1
                    yield lost_record(job, "HostError", _cause(e), self.config.host.episode)
                    continue
                self.counts["done"] += 1
                self.counts[rec["outcome"]] += 1
                yield rec
            now = time.monotonic()
            # A host that does not come back (its node is gone, say) is given up.
            for h in self.hosts:
                if h.state == "restarting" and now - h.lost_at > self.config.ready_timeout_s:
                    h.state, h.ready_ref = "dead", None
                    emit("host", f"host {h.name}: not back after {self.config.ready_timeout_s:.0f} s; given up")
            # A job past its timeout: its host is wedged. Kill it (Ray restarts it); every
            # job it held comes back through RayActorError above.
            for ref, (h, job, t0) in list(inflight.items()):
                if now - t0 > self.config.episode_timeout_s and h.state == "ready":
                    emit("timeout", (h.name, job.id))
                    self.counts["timeouts"] += 1
                    ray.kill(h.actor, no_restart=False)
                    h.state = "killed"

    def _requeue(self, h: _Host, job: Job, queue, why: str, emit) -> Iterator[dict]:
        if job.requeues >= self.config.max_requeues:
            self.counts["lost"] += 1
            yield lost_record(job, "HostLost", f"{why} (requeued {job.requeues} time(s) already)",
                              self.config.host.episode)
            return
        self.counts["requeued"] += 1
        emit("requeue", (h.name, job.id))
        queue.appendleft(replace(job, requeues=job.requeues + 1))

    def _host_lost(self, ray, h: _Host, emit) -> None:
        """The first sign that a host's actor died: wait for Ray's restart, then warm it up."""
        if h.state in ("restarting", "dead"):
            return
        h.restarts += 1
        if h.restarts > self.config.max_restarts:
            h.state = "dead"
            emit("host", f"host {h.name}: dead for good after {h.restarts - 1} restart(s)")
            return
        h.state = "restarting"
        h.lost_at = time.monotonic()
        emit("host", f"host {h.name}: lost; waiting for Ray to restart it")
        h.ready_ref = h.actor.ready.remote()     # queued by Ray until the actor is back

    def _restarted(self, ray, h: _Host, emit) -> None:
        try:
            info = ray.get(h.ready_ref)
        except ray.exceptions.RayActorError:
            # It died again while coming back (or for good): try while restarts are left.
            h.ready_ref = None
            if h.restarts >= self.config.max_restarts:
                h.state = "dead"
                emit("host", f"host {h.name}: dead for good after {h.restarts} restart(s)")
            else:
                h.restarts += 1
                h.ready_ref = h.actor.ready.remote()
            return
        except ray.exceptions.RayTaskError as e:
            h.state, h.ready_ref = "dead", None
            emit("host", f"host {h.name}: could not warm up again: {_cause(e)}")
            return
        self._on_ready(h, info)
        emit("host", f"host {h.name}: back with {h.slots} slot(s) (restart {h.restarts})")

    def evaluate(self, scenario: Scenario, completions: list[str], *, policy: str = "sampled",
                 completion_ids: list[list[int]] | None = None) -> list[dict]:
        """Run G completions against G sandboxes brought to the same starting state (the same
        deployment, fault, target and seed); return the G records in the completions' order.
        The group API of reinforcement learning (judge.Judge puts rewards on top)."""
        ids = completion_ids or [None] * len(completions)
        jobs = [Job(id=f"{scenario.id}-g{i}", scenario=scenario, policy=policy, completion=c,
                    completion_ids=tuple(t) if t is not None else None)
                for i, (c, t) in enumerate(zip(completions, ids, strict=True))]
        got = {r["id"]: r for r in self.run(jobs)}
        return [got[j.id] for j in jobs]

    # ---- observability -----------------------------------------------------------------------
    def stats(self, timeout_s: float = 5.0) -> dict:
        """Per host and fleet-wide: slots busy/idle/down, episodes, episodes per minute,
        failures by class, phase percentiles (per host), requeues and losses."""
        ray = _ray()
        live = [h for h in self.hosts if h.state == "ready"]
        refs = [h.actor.stats.remote() for h in live]
        per_host: list[dict] = []
        if refs:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for ref in done:
                try:
                    per_host.append(ray.get(ref))
                except Exception:
                    pass
        slots = collections.Counter()
        failures = collections.Counter()
        for s in per_host:
            slots.update(s["slots"])
            failures.update(s["failures"])
        elapsed = max(1e-6, time.time() - self._started)
        return {"hosts": len(self.hosts), "hosts_ready": len(live),
                "hosts_by_state": dict(collections.Counter(h.state for h in self.hosts)),
                "slots": {k: slots.get(k, 0) for k in ("total", "busy", "idle", "down")},
                "episodes": self.counts["done"] + self.counts["lost"] + self.counts["host_errors"],
                "episodes_per_min": round(60 * (self.counts["done"] + self.counts["lost"]) / elapsed, 2),
                "outcomes": {k: self.counts[k] for k in ("success", "failure", "injection_failure", "infra_failure")},
                "failures": dict(failures), "requeued": self.counts["requeued"], "lost": self.counts["lost"],
                "timeouts": self.counts["timeouts"], "per_host": per_host}

    def summary_line(self, stats: dict | None = None) -> str:
        """One line for a live display."""
        s = stats or self.stats()
        o = s["outcomes"]
        return (f"hosts {s['hosts_ready']}/{s['hosts']} | slots {s['slots']['busy']} busy {s['slots']['idle']} idle "
                f"{s['slots']['down']} down | {s['episodes']} episodes, {s['episodes_per_min']:.1f}/min | "
                f"ok {o['success']} fail {o['failure']} inj {o['injection_failure']} infra {o['infra_failure']}"
                + (f" | requeued {s['requeued']}" if s["requeued"] else ""))


def cluster_nodes(address: str = "auto") -> list[dict]:
    """The nodes of a running cluster, for `remed fleet hosts`."""
    ray = _ray()
    owned = not ray.is_initialized()
    if owned:
        private_token(create=False)
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayUnavailable(f"no Ray cluster at {address}: {e}; start one with `ray start --head "
                                 f"--resources='{{\"{RESOURCE}\": 1}}'`") from None
    try:
        return [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress", ""), "alive": bool(n.get("Alive")),
                 "resources": dict(n.get("Resources", {}))} for n in ray.nodes()]
    finally:
        if owned:
            ray.shutdown()


def _cause(e: BaseException) -> str:
    """One line from a Ray error: the remote exception's own message where there is one."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:400]
