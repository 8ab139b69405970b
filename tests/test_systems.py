"""The microservice systems: specs (and the errors a bad one gets), deployment with Ansible
into real nspawn sandboxes, the service runtime's behaviour, and the load generator.
One deployed sandbox per system, shared by the tests of that system."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.sandbox.ansible import run_playbook
from e2e_reme.simulators.errors import DeployError, NotDeployed, UnknownSystem
from e2e_reme.simulators.systems.deploy import (health, health_all, load_deployment, metrics, request_entry,
                                                verify_seed, wait_healthy)
from e2e_reme.simulators.systems.deploy import deploy as deploy_system
from e2e_reme.simulators.systems.loadgen import BackgroundLoad, check_slo, disruption, failure_budget, run_load
from e2e_reme.simulators.systems.spec import SpecError, list_systems, load_system, parse_spec

REMED = str(Path(sys.executable).parent / "remed")

# ---- specs ------------------------------------------------------------------------------------

BASE = """\
name: tiny
entry: a
placement:
  0: [a, b]
  1: [store]
services:
  a:
    kind: http
    port: 8080
    limits: {cpu_quota: 50%, memory_max: 64M}
    requests:
      go:
        calls: [b/leaf]
        cpu_ms: 1
  b:
    kind: http
    port: 8081
    requests:
      leaf:
        cpu_ms: 0.5
        redis: [{service: store, op: get, key: "k:{user}"}]
  store:
    kind: redis
    port: 6379
request_mix: {go: 1}
slo: {success_rate: 0.99, p95_ms: 200, rps: 5, window_s: 5}
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[nth - 1]


# (id, replace this, with that, the line to blame (text on it, which occurrence), reason)
BAD_SPECS = [
    ("unknown-dependency", "calls: [b/leaf]", "calls: [nosuch/leaf]", ("nosuch/leaf", 1), "calls unknown service 'nosuch'"),
    ("unknown-request-type", "calls: [b/leaf]", "calls: [b/nope]", ("b/nope", 1), "unknown request type 'b/nope'"),
    ("malformed-call", "calls: [b/leaf]", "calls: [b]", ("calls: [b]", 1), "must be '<service>/<request type>'"),
    ("port-clash-on-a-node", "port: 8081", "port: 8080", ("port: 8080", 2), "port 8080 is used twice on node 0"),
    ("call-graph-cycle", "        cpu_ms: 0.5\n", "        cpu_ms: 0.5\n        calls: [a/go]\n", ("  a:", 1),
     "call-graph cycle: a -> b -> a"),
    ("self-call", "calls: [b/leaf]", "calls: [a/go]", ("calls: [a/go]", 1), "calls itself"),
    ("missing-entry", "entry: a\n", "", ("name: tiny", 1), "entry: required key is missing"),
    ("unknown-entry", "entry: a\n", "entry: zz\n", ("entry: zz", 1), "entry 'zz' is not a service"),
    ("redis-entry", "entry: a\n", "entry: store\n", ("entry: store", 1), "must be an http service"),
    ("placed-twice", "1: [store]", "1: [store, a]", ("1: [store, a]", 1), "service 'a' is placed twice (nodes 0 and 1)"),
    ("not-placed", "0: [a, b]", "0: [a]", ("  b:", 1), "service 'b' is not placed on any node"),
    ("placement-gap", "  1: [store]", "  2: [store]", ("placement:", 1), "numbered 0..N-1"),
    ("bad-cpu-quota", "cpu_quota: 50%", "cpu_quota: half", ("cpu_quota: half", 1), "not a systemd CPUQuota="),
    ("bad-memory-max", "memory_max: 64M", "memory_max: 64MB", ("memory_max: 64MB", 1), "not a systemd MemoryMax="),
    ("unknown-key", "        cpu_ms: 1\n", "        cpu_msec: 1\n", ("cpu_msec", 1), "unknown key"),
    ("service-defined-twice", "  store:\n", "  a:\n    kind: http\n    port: 9000\n    requests: {x: {}}\n  store:\n",
     ("  a:", 2), "'services.a' is defined twice"),
    ("unknown-mix-type", "request_mix: {go: 1}", "request_mix: {go: 1, fly: 2}", ("request_mix", 1),
     "request_mix type 'fly' is not a request type of the entry 'a'"),
    ("redis-op-on-http", "service: store, op: get", "service: a, op: get", ("service: a, op: get", 1),
     "uses 'a' as redis, but it is http"),
    ("bad-redis-placeholder", '"k:{user}"', '"k:{session}"', ("k:{session}", 1), "unknown placeholder(s) session"),
    ("unreachable-service", "calls: [b/leaf]", "calls: []", ("  b:", 1), "service 'b' is not reachable from the entry"),
    ("bad-port", "port: 8081", "port: 99", ("port: 99", 1), "greater than or equal to 1024"),
    ("not-yaml", "request_mix: {go: 1}", "request_mix: {go: 1", ("slo:", 1), "not valid YAML"),
]


@pytest.mark.parametrize("case_id,old,new,blame,reason", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_a_bad_spec_is_refused_naming_file_line_and_reason(tmp_path, case_id, old, new, blame, reason):
    assert old in BASE
    text = BASE.replace(old, new, 1)
    path = tmp_path / f"{case_id}.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_system(path)
    want = f"{path}:{line_of(text, *blame)}: "
    hits = [l for l in str(exc.value).splitlines() if l.startswith(want) and reason in l]
    assert hits, f"expected a line '{want}...{reason}...' in:\n{exc.value}"


def test_the_base_of_the_bad_specs_is_itself_valid():
    spec = parse_spec(BASE, "base.yaml")
    assert (spec.nodes, spec.entry, spec.hops("a", "go")) == (2, "a", 2)
    assert spec.services["b"].dependencies() == ("store",)


def test_an_unknown_system_name_lists_the_catalog():
    with pytest.raises(UnknownSystem, match="known: boutique, simple-micro, train-ticket"):
        load_system("nosuch")


@pytest.mark.parametrize("name", ["simple-micro", "boutique", "train-ticket"])
def test_the_shipped_systems_load(name):
    assert name in list_systems()
    spec = load_system(name)
    assert spec.name == name and spec.slo.rps > 0 and spec.request_mix
    for rtype in spec.request_mix:
        assert spec.hops(spec.entry, rtype) >= 1


def test_boutique_has_the_real_call_graph():
    spec = load_system("boutique")
    edges = {n: set(s.dependencies()) for n, s in spec.services.items()}
    assert edges["frontend"] == {"adservice", "cartservice", "productcatalogservice", "currencyservice",
                                 "recommendationservice", "shippingservice", "checkoutservice"}
    assert edges["checkoutservice"] == {"cartservice", "productcatalogservice", "currencyservice",
                                        "shippingservice", "emailservice", "paymentservice"}
    assert edges["recommendationservice"] == {"productcatalogservice"}
    assert edges["cartservice"] == {"redis-cart"}
    assert len(spec.services) == 11 and spec.redis_services() == ["redis-cart"]


def test_train_ticket_has_its_services_by_their_real_names():
    spec = load_system("train-ticket")
    names = set(spec.services)
    assert len(names) >= 40
    for must in ("ts-ui-dashboard", "ts-auth-service", "ts-user-service", "ts-verification-code-service",
                 "ts-station-service", "ts-train-service", "ts-travel-service", "ts-travel2-service",
                 "ts-route-service", "ts-price-service", "ts-basic-service", "ts-ticketinfo-service",
                 "ts-order-service", "ts-order-other-service", "ts-seat-service", "ts-config-service",
                 "ts-contacts-service", "ts-preserve-service", "ts-preserve-other-service", "ts-security-service",
                 "ts-food-service", "ts-consign-service", "ts-consign-price-service", "ts-assurance-service",
                 "ts-inside-payment-service", "ts-payment-service", "ts-cancel-service", "ts-rebook-service",
                 "ts-execute-service", "ts-notification-service", "ts-route-plan-service", "ts-travel-plan-service",
                 "ts-delivery-service", "ts-news-service", "ts-voucher-service", "ts-avatar-service",
                 "ts-wait-order-service", "ts-gateway-service"):
        assert must in names, must
    assert sum(n.startswith("ts-admin-") for n in names) >= 4


# ---- deployed systems ------------------------------------------------------------------------

def _deployed(system: str):
    with create_sandbox("nspawn", nodes=load_system(system).nodes, name=f"pt-{secrets.token_hex(3)}") as sb:
        with pytest.raises(NotDeployed, match=f"no system deployed in sandbox {sb.name}"):
            load_deployment(sb)
        dep = deploy_system(sb, system)
        yield sb, dep


@pytest.fixture(scope="module")
def micro(image):
    yield from _deployed("simple-micro")


@pytest.fixture(scope="module")
def boutique(image):
    yield from _deployed("boutique")


@pytest.fixture(params=["micro", "boutique"])
def deployed(request):
    return request.getfixturevalue(request.param)


def test_every_unit_is_active_and_every_service_healthy(deployed):
    sb, dep = deployed
    for node in {t.node for t in dep.targets.values()}:
        units = dep.units(node)
        res = sb.exec(["systemctl", "is-active", *units], node=node)
        assert res.stdout.split() == ["active"] * len(units), res.stdout
    for name, p in health_all(dep.targets).items():
        assert p.ok, (name, p)
        if dep.targets[name].kind == "http":
            assert (p.status, p.token) == (200, dep.token)


def test_the_deployment_is_recorded_and_reloads_from_another_handle(deployed):
    sb, dep = deployed
    again = load_deployment(sb.name)
    assert again.to_json() == dep.to_json()
    assert again.entry.service == dep.spec.entry and again.targets == dep.targets
    assert dep.deploy_s > 0 and set(dep.timings) == {"render", "playbook", "ready", "smoke"}


def test_limits_from_the_spec_are_on_the_units(deployed):
    sb, dep = deployed
    t = dep.entry
    lim = dep.spec.services[t.service].limits
    res = sb.exec(f"systemctl show {t.unit} -p CPUQuotaPerSecUSec -p MemoryMax -p Restart", node=t.node)
    props = dict(l.split("=", 1) for l in res.stdout.split())
    pct = int(lim.cpu_quota.rstrip("%"))
    assert props["CPUQuotaPerSecUSec"] == (f"{pct * 10}ms" if pct < 100 else f"{pct / 100:g}s")
    assert int(props["MemoryMax"]) == int(lim.memory_max.rstrip("M")) * 1024 * 1024
    assert props["Restart"] == "on-failure"


def test_seed_data_is_in_place(deployed):
    sb, dep = deployed
    assert dep.seed["files"], "every shipped system seeds some files"
    assert verify_seed(sb, dep) == []


def test_a_request_traverses_the_call_graph(boutique):
    sb, dep = boutique
    leaves = ("paymentservice", "emailservice", "shippingservice")
    before = {n: metrics(dep.targets[n])["requests"] for n in leaves}
    status, body = request_entry(dep, "checkout", user="u7")
    assert (status, body["hops"]) == (200, dep.spec.hops("frontend", "checkout")) == (200, 10)
    after = {n: metrics(dep.targets[n])["requests"] for n in leaves}
    assert after == {"paymentservice": before["paymentservice"] + 1, "emailservice": before["emailservice"] + 1,
                     "shippingservice": before["shippingservice"] + 2}      # a quote, then the shipment
    cart = metrics(dep.targets["cartservice"])
    assert cart["calls"]["redis-cart"]["ok"] >= 3 and cart["errors"] == 0


def test_the_load_generator_meets_the_slo_at_the_standard_load(deployed):
    sb, dep = deployed
    res = run_load(dep, seed=7)
    assert res.sent == round(dep.slo.rps * dep.slo.window_s)
    assert set(res.by_type) <= set(dep.request_mix)
    verdict = check_slo(res, dep.slo)
    assert verdict.ok, (verdict.reasons, res)


def test_load_is_only_sent_inside_the_sandbox(boutique):
    sb, dep = boutique
    from dataclasses import replace
    outside = replace(dep, entry=replace(dep.entry, host="192.0.2.1"))
    with pytest.raises(ValueError, match="not inside sandbox"):
        run_load(outside, window_s=1)


def test_a_wrong_dependency_address_in_a_config_makes_entry_requests_fail(boutique):
    sb, dep = boutique
    fe, cart = dep.targets["frontend"], dep.targets["cartservice"]
    edit = (f"sed -i.orig 's/^    port: {cart.port}$/    port: 1/' {fe.config_path} && "
            f"grep -c '^    port: 1$' {fe.config_path} && systemctl restart {fe.unit}")
    assert sb.exec(edit, node=fe.node).stdout.strip() == "1"
    try:
        wait_healthy(sb, dep, timeout_s=20)
        status, body = request_entry(dep, "home")
        assert status == 502 and "cartservice/get" in body["error"] and f"{cart.host}:1" in body["error"], body
        assert request_entry(dep, "add_to_cart")[0] == 502
        # checkout reaches the cart through checkoutservice's own config, which is right.
        assert request_entry(dep, "checkout")[0] == 200
    finally:
        sb.exec(f"mv {fe.config_path}.orig {fe.config_path} && systemctl restart {fe.unit}", node=fe.node)
    wait_healthy(sb, dep, timeout_s=20)
    assert request_entry(dep, "home")[0] == 200


def test_redis_down_makes_its_users_unhealthy_and_its_seed_survives_a_restart(boutique):
    sb, dep = boutique
    redis, cart = dep.targets["redis-cart"], dep.targets["cartservice"]
    sb.exec(f"systemctl stop {redis.unit}", node=redis.node)
    try:
        p = health(cart)
        assert (p.ok, p.status) == (False, 503) and "redis redis-cart does not answer" in p.detail
        assert health(dep.targets["frontend"]).ok       # health does not cascade
        status, body = request_entry(dep, "add_to_cart")
        assert status == 502 and "redis redis-cart" in body["error"]
    finally:
        sb.exec(f"systemctl start {redis.unit}", node=redis.node)
    wait_healthy(sb, dep, timeout_s=20)
    assert verify_seed(sb, dep) == []


def test_a_load_with_a_failure_budget_stops_once_the_budget_is_spent(boutique):
    sb, dep = boutique
    redis = dep.targets["redis-cart"]
    sb.exec(f"systemctl stop {redis.unit}", node=redis.node)   # every cart request fails
    try:
        res = run_load(dep, seed=3, max_failures=failure_budget(dep.slo))
    finally:
        sb.exec(f"systemctl start {redis.unit}", node=redis.node)
    wait_healthy(sb, dep, timeout_s=20)
    assert not check_slo(res, dep.slo).ok
    # Stopped at the first failure past the budget, long before the window's end.
    assert res.sent < dep.slo.rps * dep.slo.window_s / 2 and res.duration_s < dep.slo.window_s / 2, res


def test_the_failure_budget_is_the_most_failures_that_still_meet_the_slo():
    slo = load_system("simple-micro").slo
    n = round(slo.rps * slo.window_s)
    k = failure_budget(slo)
    assert (n - k) / n >= slo.success_rate > (n - k - 1) / n


def test_seed_loss_is_detected(boutique):
    sb, dep = boutique
    redis = dep.seed["redis"]["redis-cart"]
    key = sorted(redis["keys"])[0]
    node, files = next(iter(dep.seed["files"].items()))
    path = sorted(files)[0]
    assert sb.exec(f"redis-cli -p {redis['port']} DEL {key}", node=redis["node"]).stdout.strip() == "1"
    assert sb.exec(f"mv {path} {path}.away", node=int(node)).ok
    try:
        problems = verify_seed(sb, dep)
        assert f"redis redis-cart: key {key} is missing" in problems
        assert f"node {node}: seed file {path} is missing" in problems
    finally:
        sb.exec(f"mv {path}.away {path}", node=int(node))
        sb.exec("python3 /opt/remed/service.py seed-redis /etc/remed/redis-cart.seed.json", node=redis["node"])
    assert verify_seed(sb, dep) == []


def test_a_deployment_survives_a_checkpoint_and_reset_restores_it(boutique):
    sb, dep = boutique
    sb.checkpoint()                       # reboots the nodes: units enabled, data on disk
    wait_healthy(sb, dep, timeout_s=30)
    assert verify_seed(sb, dep) == []
    redis, cart = dep.targets["redis-cart"], dep.targets["cartservice"]
    sb.exec(f"redis-cli -p {redis.port} DEL cart:seed-001; systemctl stop {cart.unit}", node=cart.node)
    assert request_entry(dep, "home")[0] == 502 and verify_seed(sb, dep)
    sb.reset()
    wait_healthy(sb, dep, timeout_s=30)
    assert verify_seed(sb, dep) == [] and request_entry(dep, "home")[0] == 200
    assert load_deployment(sb).token == dep.token


def test_background_load_records_a_disruption_and_the_recovery(micro):
    sb, dep = micro
    leaf = dep.targets["time-service"]
    with BackgroundLoad(dep, rps=10, seed=3) as bg:
        time.sleep(1.0)
        sb.exec(f"systemctl stop {leaf.unit}", node=leaf.node)
        time.sleep(1.0)
        sb.exec(f"systemctl start {leaf.unit}", node=leaf.node)
        wait_healthy(sb, dep, timeout_s=20)
        time.sleep(1.0)
    res = bg.result
    assert res.sent >= 25 and 0 < res.ok < res.sent
    assert set(res.errors) == {"http_502"}, res.errors
    buckets = disruption(bg.samples)
    assert buckets[0]["success_rate"] == 1.0 and buckets[-1]["success_rate"] == 1.0
    assert min(b["success_rate"] for b in buckets) < 1.0


def test_the_service_log_has_a_start_line_and_one_line_per_error(micro):
    sb, dep = micro
    hello, leaf = dep.targets["hello-service"], dep.targets["time-service"]
    sb.exec(f"systemctl stop {leaf.unit}", node=leaf.node)
    try:
        assert [request_entry(dep, "hello", user=f"log{i}")[0] for i in range(3)] == [502] * 3
    finally:
        sb.exec(f"systemctl start {leaf.unit}", node=leaf.node)
    wait_healthy(sb, dep, timeout_s=20)
    out = sb.exec(f"journalctl -u {hello.unit} -o cat --no-pager", node=hello.node).stdout
    assert "hello-service (simple-micro) listening on :8080" in out
    errors = [l for l in out.splitlines() if l.startswith("error hello 502") and "time-service/now" in l]
    assert len(errors) >= 3, out


def test_deploying_again_replaces_the_deployment(micro):
    sb, dep = micro
    again = deploy_system(sb, "simple-micro")
    assert again.token != dep.token
    assert {p.token for p in health_all(again.targets).values()} == {again.token}
    assert load_deployment(sb).token == again.token


def test_a_system_that_needs_more_nodes_is_refused(micro):
    sb, _ = micro
    with pytest.raises(DeployError, match="needs 3 node"):
        deploy_system(sb, "train-ticket")


def test_train_ticket_deploys_serves_its_mix_and_meets_its_slo(image):
    spec = load_system("train-ticket")
    with create_sandbox("nspawn", nodes=spec.nodes, name=f"pt-{secrets.token_hex(3)}") as sb:
        t0 = time.monotonic()
        dep = deploy_system(sb, spec)
        took = time.monotonic() - t0
        mib = [sb.node_memory_mib(i) for i in range(spec.nodes)]
        print(f"\ntrain-ticket: {len(dep.targets)} services deployed in {took:.1f} s "
              f"(playbook {dep.timings['playbook']:.1f} s); node memory MiB {[round(m) for m in mib]}")
        assert all(p.ok for p in health_all(dep.targets).values())
        assert verify_seed(sb, dep) == []
        res = run_load(dep, seed=11)
        assert check_slo(res, dep.slo).ok, res


# ---- running playbooks: outcomes are data --------------------------------------------------

def _play(*tasks: dict) -> list[dict]:
    return [{"hosts": "all", "gather_facts": False, "tasks": list(tasks)}]


def test_a_playbook_run_reports_status_stats_and_events(micro, tmp_path):
    sb, _ = micro
    inv = sb.write_inventory(tmp_path / "hosts.yaml")
    run = run_playbook(inv, _play({"name": "say", "command": "echo hi"}), tmp_path / "pdd", timeout_s=60,
                       extravars={"x": 1})
    assert (run.status, run.rc, run.ok) == ("successful", 0, True), run.summary()
    assert run.stats["n0"].ok == 1 and run.stats["n0"].clean
    assert any(e.get("event") == "runner_on_ok" and e["event_data"]["task"] == "say" for e in run.events)
    assert "hi" in json.dumps([e.get("event_data", {}).get("res") for e in run.events])


def test_a_failing_task_is_a_failed_run_naming_the_task(micro, tmp_path):
    sb, _ = micro
    inv = sb.write_inventory(tmp_path / "hosts.yaml")
    run = run_playbook(inv, _play({"name": "break", "shell": "echo nope >&2; exit 3"}), tmp_path / "pdd", timeout_s=60)
    assert (run.status, run.rc) == ("failed", 2)
    assert run.stats["n0"].failures == 1
    assert run.failed_tasks()[0]["task"] == "break" and "nope" in run.summary()


def test_a_playbook_that_runs_too_long_times_out(micro, tmp_path):
    sb, _ = micro
    inv = sb.write_inventory(tmp_path / "hosts.yaml")
    t0 = time.monotonic()
    run = run_playbook(inv, _play({"name": "hang", "command": "sleep 60"}), tmp_path / "pdd", timeout_s=2)
    assert run.status == "timeout" and time.monotonic() - t0 < 15


@pytest.mark.parametrize("playbook,says", [
    (_play({"name": "bad", "no_such_module": {}}), "no_such_module"),
    ("/nonexistent/playbook.yml", "no such file"),
], ids=["unknown-module", "missing-file"])
def test_a_playbook_ansible_cannot_run_is_a_failed_run_saying_why(micro, tmp_path, playbook, says):
    sb, _ = micro
    inv = sb.write_inventory(tmp_path / "hosts.yaml")
    run = run_playbook(inv, playbook, tmp_path / "pdd", timeout_s=60)
    assert run.status == "failed" and says in run.summary(), run.summary()


# ---- the CLI ------------------------------------------------------------------------------

def remed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([REMED, *args], capture_output=True, text=True, timeout=180,
                          env=os.environ | {"COLUMNS": "200"})


def test_cli_lists_the_systems():
    res = remed("system", "ls", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"simple-micro", "boutique", "train-ticket"}
    assert (rows["boutique"]["services"], rows["boutique"]["nodes"]) == (11, 2)


def test_cli_status_shows_every_service(boutique):
    sb, dep = boutique
    res = remed("system", "status", "--sandbox", sb.name, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    st = json.loads(res.stdout)
    assert st["healthy"] and set(st["services"]) == set(dep.targets)
    assert all(s["unit_state"] == "active" and s["latency_ms"] > 0 for s in st["services"].values())


def test_cli_up_with_a_system_sizes_deploys_and_down_removes(image, sb_name):
    res = remed("sandbox", "up", "--system", "simple-micro", "--name", sb_name, "--json")
    try:
        assert res.returncode == 0, res.stderr
        desc = json.loads(res.stdout)
        assert len(desc["nodes"]) == 1 and desc["system"] == "simple-micro"
        st = remed("system", "status", "--sandbox", sb_name)
        assert st.returncode == 0 and "all services healthy" in st.stdout, st.stdout + st.stderr
    finally:
        assert remed("sandbox", "down", sb_name).returncode == 0


@pytest.mark.parametrize("args,says", [
    (("system", "deploy", "nosuch", "--sandbox", "pt-none"), "unknown system 'nosuch'"),
    (("system", "status", "--sandbox", "pt-none"), "no sandbox named 'pt-none'"),
    (("sandbox", "up", "--system", "boutique", "--nodes", "1"), "places services on 2 nodes"),
])
def test_cli_mistakes_get_one_clear_line(args, says):
    res = remed(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and says in lines[0], res.stderr


def test_cli_status_of_a_sandbox_without_a_system_says_how_to_deploy(image, sb_name):
    with create_sandbox("nspawn", nodes=1, name=sb_name):
        res = remed("system", "status", "--sandbox", sb_name)
        assert res.returncode == 2
        assert f"no system deployed in sandbox {sb_name}; run `remed system deploy SYSTEM --sandbox {sb_name}`" \
            in " ".join(res.stderr.split())
