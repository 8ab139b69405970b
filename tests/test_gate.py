"""The safety gate, specified by what it refuses (each rule, by name) and what it must let
through: every playbook of the expert runbook, and ordinary remediations. Pure and fast.

The gate is defence in depth (docs/gate.md): these tests pin the spellings it recognises,
not a proof that no other spelling exists; the jailed controller is the boundary."""

from __future__ import annotations

import json

import pytest
import yaml

from e2e_reme.simulators.faults import fault_catalog
from e2e_reme.simulators.playbook.gate import RULES, GateResult, Violation, check_playbook, check_text
from e2e_reme.simulators.policies.expert import RunbookInput, expert_playbook
from e2e_reme.simulators.systems.target import ServiceTarget

HOSTS = ("n0", "n1")
UNIT = "remed-hello-service.service"
DATA = "/var/lib/remed/hello-service"


def play(*tasks, hosts="n0", **kw) -> list[dict]:
    return [{"hosts": hosts, "gather_facts": False, **kw, "tasks": list(tasks)}]


def shell(script: str, **kw) -> dict:
    return {"name": "t", "ansible.builtin.shell": script, **kw}


def rules(plays) -> list[str]:
    return list(check_playbook(plays, HOSTS).rules)


# ---- the result ---------------------------------------------------------------------------------

def test_a_benign_playbook_passes_with_an_empty_reason():
    res = check_playbook(play({"name": "restart", "ansible.builtin.systemd_service": {"name": UNIT, "state": "restarted"}}),
                         HOSTS)
    assert res == GateResult(ok=True, violations=()) and res.reason == ""
    assert res.to_dict() == {"ok": True, "reason": "", "rules": [], "violations": []}


def test_every_violation_is_gathered_with_where_it_is():
    plays = play(shell("reboot"), {"name": "wipe", "file": {"path": "/etc", "state": "absent"}},
                 hosts="localhost")
    res = check_playbook(plays, HOSTS)
    assert not res.ok
    assert list(res.rules) == ["hosts_outside_inventory", "reboot", "destructive_delete"]
    wipe = next(v for v in res.violations if v.rule == "destructive_delete")
    assert (wipe.play, wipe.task) == (0, "wipe")
    assert res.reason.startswith("hosts_outside_inventory: 'localhost' is the controller") and "\n" not in res.reason


def test_to_dict_is_json_safe():
    d = check_playbook(play(shell("kill -9 -1")), HOSTS).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["violations"][0] == {"rule": "kills_everything", "detail": d["violations"][0]["detail"],
                                  "play": 0, "task": "t"}


def test_unnamed_tasks_are_located_by_position():
    res = check_playbook(play({"debug": {"msg": "x"}}, {"block": [{"command": "reboot"}]}), HOSTS)
    assert [v.task for v in res.violations] == ["tasks[1].block[0]"]


def test_violation_prints_as_one_line():
    assert str(Violation("reboot", "x", 1, "t")) == "reboot: x (play 2, task 't')"


# ---- not_a_playbook / unfollowable_include ---------------------------------------------------------

@pytest.mark.parametrize("plays", [
    {"hosts": "n0", "tasks": []},                       # a play, not a list of plays
    "- hosts: n0",
    None,
    [],
    ["hosts: n0"],
    [{"tasks": [{"command": "id"}]}],                    # no hosts
    [{"hosts": "n0", "tasks": {"command": "id"}}],       # tasks not a list
    [{"hosts": "n0", "tasks": ["command: id"]}],         # a task not a mapping
], ids=["dict", "str", "none", "empty", "str-play", "no-hosts", "tasks-dict", "task-str"])
def test_not_a_playbook(plays):
    assert rules(plays) == ["not_a_playbook"]


def test_a_recursive_structure_is_not_a_playbook():
    tasks: list = []
    tasks.append({"block": tasks})
    assert rules([{"hosts": "n0", "tasks": tasks}]) == ["not_a_playbook"]


@pytest.mark.parametrize("plays", [
    [{"import_playbook": "other.yml"}],
    [{"ansible.builtin.import_playbook": "other.yml"}],
    play({"include_tasks": "fix.yml"}),
    play({"ansible.builtin.import_tasks": "fix.yml"}),
    play({"include_role": {"name": "fixer"}}),
    play({"ansible.builtin.import_role": {"name": "fixer"}}),
    play({"ansible.builtin.include_vars": "vars.yml"}),
    play({"block": [{"import_tasks": "fix.yml"}]}),
    [{"hosts": "n0", "roles": ["fixer"]}],
    [{"hosts": "n0", "vars_files": ["v.yml"], "tasks": []}],
], ids=["import_playbook", "fqcn-import_playbook", "include_tasks", "import_tasks", "include_role",
        "import_role", "include_vars", "in-block", "roles", "vars_files"])
def test_unfollowable_include(plays):
    assert rules(plays) == ["unfollowable_include"]


# ---- hosts_outside_inventory ----------------------------------------------------------------------

@pytest.mark.parametrize("hosts", ["n0", "n1", "all", "*", ["n0", "n1"], "n0,n1", "n0:n1", "all:!n1",
                                   "n0:&all", "n*", "~n[01]", "n0[0]"])
def test_hosts_within_the_inventory_pass(hosts):
    assert rules(play({"ping": {}}, hosts=hosts)) == []


@pytest.mark.parametrize("hosts", ["localhost", "127.0.0.1", "::1", ["n0", "localhost"], "n0,localhost",
                                   "n0:127.0.0.1", "local*", "~.*host", "~^l", "x*", "web", "198.18.0.2",
                                   "{{ target_node }}", "", ["n0", {"x": 1}], {"n0": None}])
def test_hosts_outside_the_inventory_are_refused(hosts):
    assert rules(play({"ping": {}}, hosts=hosts)) == ["hosts_outside_inventory"]


# ---- controller_delegation ----------------------------------------------------------------------

@pytest.mark.parametrize("plays", [
    play({"command": "id", "delegate_to": "localhost"}),
    play({"command": "id", "delegate_to": "127.0.0.1", "run_once": True}),
    play({"command": "id", "delegate_to": "{{ groups['all'][0] }}"}),
    play({"command": "id", "delegate_to": "{{ item }}", "loop": ["n0", "localhost"]}),
    play({"block": [{"command": "id"}], "delegate_to": "localhost"}),
    play({"local_action": "command touch /tmp/x"}),
    play({"local_action": {"module": "ansible.builtin.shell", "cmd": "id"}}),
    play({"command": "id"}, connection="local"),
    play({"command": "id", "connection": "local"}),
    play({"command": "id"}, vars={"ansible_connection": "local"}),
    play({"command": "id", "vars": {"ansible_host": "127.0.0.1"}}),
    play({"command": "id", "vars": {"ansible_ssh_common_args": "-o ProxyCommand='touch /tmp/pwn'"}}),
    play({"set_fact": {"ansible_connection": "local"}}),
    play({"debug": {"msg": "{{ lookup('pipe', 'touch /tmp/pwn') }}"}}),
    play({"command": "echo {{ query('ansible.builtin.file', '/etc/shadow') }}"}),
    play({"debug": {"msg": "{{ item }}"}, "with_lines": "cat /etc/passwd"}),
    play({"ansible.builtin.fetch": {"src": "/etc/remed/a.yaml", "dest": "/tmp/"}}),
    play({"ansible.posix.synchronize": {"src": "/", "dest": "/tmp"}}),
], ids=["delegate-localhost", "run-once-127", "delegate-templated", "delegate-loop", "block-delegate",
        "local_action-str", "local_action-dict", "play-connection", "task-connection", "play-vars",
        "ansible_host", "proxycommand", "set_fact", "lookup-pipe", "query-file", "with_lines", "fetch",
        "synchronize"])
def test_controller_delegation(plays):
    assert "controller_delegation" in rules(plays)


@pytest.mark.parametrize("task", [
    {"command": "id", "delegate_to": "n1"},
    {"command": "id", "delegate_to": "{{ inventory_hostname }}"},
    {"command": "id", "delegate_to": "{{ item }}", "loop": ["n0", "n1"]},
    {"command": "id", "connection": "ssh"},
    {"command": "id", "vars": {"ansible_connection": "ssh", "ansible_python_interpreter": "/usr/bin/python3"}},
    {"debug": {"msg": "{{ lookup('vars', 'x') }}"}},
])
def test_delegation_within_the_inventory_passes(task):
    assert rules(play(task)) == []


# ---- reboot ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [
    {"ansible.builtin.reboot": {}},
    {"reboot": None},
    {"community.general.shutdown": {}},
    shell("reboot"), shell("/sbin/reboot -f"), shell("sudo poweroff"), shell("halt -p"),
    shell("shutdown -r now"), shell("systemctl reboot"), shell("systemctl --no-block poweroff"),
    shell("systemctl halt"), shell("systemctl kexec"), shell("systemctl isolate rescue.target"),
    shell("init 6"), shell("init 0"), shell("telinit 1"), shell("echo b > /proc/sysrq-trigger"),
    shell("sleep 1 && nohup sh -c 'reboot' &"), shell("if true; then reboot; fi"),
    {"command": {"argv": ["systemctl", "reboot"]}},
    {"command": "timeout 5 shutdown -h now"},
    {"shell": "{{ cmd }}", "vars": {"cmd": "reboot"}},
    shell("kill -INT 1"),
], ids=lambda t: json.dumps(t)[:60])
def test_reboot(task):
    assert "reboot" in rules(play(task))


@pytest.mark.parametrize("script", ["echo 'no reboot needed'", "redis-cli -p 6379 shutdown nosave || true",
                                    "command -v reboot", "journalctl -b -1 | grep -i halt | tail -1",
                                    "kill -0 1"])
def test_words_that_only_mention_a_reboot_pass(script):
    assert rules(play(shell(script))) == []


# ---- destructive_delete -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/etc", "/usr", "/var", "/var/lib", "/var/lib/remed", "/opt", "/opt/remed",
                                  "/root", "/home", "/boot", "/bin", "/lib", "/sbin", "/etc/remed", "/etc/", "//etc",
                                  "/var/lib/../lib"])
def test_file_absent_on_a_protected_path(path):
    assert "destructive_delete" in rules(play({"ansible.builtin.file": {"path": path, "state": "absent"}}))


@pytest.mark.parametrize("script", [
    "rm -rf /", "rm -rf /*", "rm -rf --no-preserve-root /", "rm -fr /etc", "rm -r -f /usr/", "rm -rf /var/lib/remed",
    "rm -rf /var/lib/remed/*", "rm -rf /opt/*", "rm -rf /e*", "rm -rf ~", "rm -rf $HOME", "cd / && rm -rf *",
    "rm -rf /var/lib/remed/$SVC", "sudo rm -Rf /boot", "find / -delete", "find /etc -exec rm -rf {} +",
    "mv /etc /tmp/etc.bak", "chmod -R 000 /",
    "python3 -c 'import shutil; shutil.rmtree(\"/usr\")'",
], ids=lambda s: s[:40])
def test_shell_deleting_a_protected_path(script):
    assert "destructive_delete" in rules(play(shell(script)))


@pytest.mark.parametrize("task", [
    {"file": "path=/etc state=absent"},
    {"file": {"path": "{{ item }}", "state": "absent"}, "loop": ["/tmp/x", "/usr"]},
    {"file": {"path": "{{ d }}", "state": "absent"}, "vars": {"d": "/opt/remed"}},
    {"command": {"cmd": "rm -rf /var"}},
    {"command": {"argv": ["rm", "-rf", "/root"]}},
    {"shell": "rm -rf *", "args": {"chdir": "/etc"}},
    {"action": "shell rm -rf /home"},
    {"shell": None, "args": {"cmd": "rm -rf /usr"}},
    {"ansible.legacy.command": "rm -rf /sbin"},
], ids=["free-form", "loop", "vars", "cmd", "argv", "chdir", "action", "args-cmd", "legacy"])
def test_destructive_delete_in_every_argument_form(task):
    assert "destructive_delete" in rules(play(task))


def test_a_literal_fact_is_followed_into_later_tasks():
    assert rules(play({"ansible.builtin.set_fact": {"target": "/boot"}},
                      {"file": {"path": "{{ target }}", "state": "absent"}})) == ["destructive_delete"]


@pytest.mark.parametrize("task", [
    {"file": {"path": f"{DATA}/flood.log", "state": "absent"}},
    {"file": {"path": f"{DATA}/log/hello-service.debug.log", "state": "absent"}},
    {"file": {"path": f"/etc/systemd/system/{UNIT}.d/override.conf", "state": "absent"}},
    {"file": {"path": f"/etc/systemd/system/{UNIT}.d", "state": "absent"}},
    shell(f"rm -f {DATA}/fill.bin"),
    shell(f"rm -rf {DATA}/tmp-stress-ng-*"),
    shell("rm -rf /tmp/scratch"),
    shell(f"find {DATA} -xdev -type f -size +1M -not -path '{DATA}/seed/*' -print -delete"),
    shell(f"for f in $(ls {DATA}/*.log); do rm -f $f; done"),
], ids=lambda t: json.dumps(t)[:70])
def test_deleting_a_specific_file_passes(task):
    assert rules(play(task)) == []


# ---- device_write -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [
    shell("mkfs.ext4 /dev/sda1"), shell("mkfs -t xfs /dev/vdb"), shell("dd if=/dev/zero of=/dev/sda bs=1M"),
    shell("cat /dev/urandom > /dev/sda"), shell("echo x >> /dev/nvme0n1"), shell("wipefs -a /dev/sdb"),
    shell("shred -n1 /dev/sda"), shell("fdisk /dev/sda < script"), shell("parted -s /dev/sda mklabel gpt"),
    shell("sfdisk /dev/vda < layout"), shell("echo 1 > /dev/watchdog"),
    {"community.general.filesystem": {"fstype": "ext4", "dev": "/dev/sdb"}},
    {"copy": {"content": "x", "dest": "/dev/sda"}},
], ids=lambda t: json.dumps(t)[:50])
def test_device_write(task):
    assert "device_write" in rules(play(task))


@pytest.mark.parametrize("script", ["cmd >/dev/null 2>&1", "echo x > /dev/stderr", "dd if=/dev/zero of=/tmp/f bs=1M count=1",
                                    "head -c 10 /dev/urandom | base64", "echo hi > /dev/shm/x"])
def test_harmless_device_use_passes(script):
    assert rules(play(shell(script))) == []


# ---- stops_sshd / kills_everything ---------------------------------------------------------------

@pytest.mark.parametrize("task", [
    {"ansible.builtin.service": {"name": "ssh", "state": "stopped"}},
    {"service": {"name": "sshd", "enabled": False}},
    {"ansible.builtin.systemd": {"name": "ssh.service", "masked": True}},
    {"ansible.builtin.systemd_service": {"name": "ssh.socket", "state": "stopped"}},
    {"systemd": "name=sshd.service state=stopped"},
    {"systemd_service": {"name": "{{ item }}", "state": "stopped"}, "loop": ["cron", "ssh"]},
    shell("systemctl stop ssh"), shell("systemctl disable --now sshd.service"), shell("systemctl mask ssh"),
    shell("systemctl kill ssh.service"), shell("service ssh stop"), shell("/etc/init.d/ssh stop"),
    shell("pkill sshd"), shell("pkill -9 -f ssh"), shell("killall sshd"), shell("kill $(pidof sshd)"),
    shell("kill -9 $(cat /run/sshd.pid)"), shell("pgrep sshd | xargs kill"),
    shell("apt-get remove -y openssh-server"), shell("iptables -A INPUT -p tcp --dport 22 -j DROP"),
    shell("iptables -P INPUT DROP"), shell("nft add rule inet filter input tcp dport 22 drop"),
    shell("ip link set host0 down"), shell("ifdown eth0"),
    {"ansible.builtin.iptables": {"chain": "INPUT", "destination_port": "22", "jump": "DROP"}},
    {"ansible.posix.authorized_key": {"user": "root", "key": "x", "state": "absent"}},
    {"file": {"path": "/root/.ssh/authorized_keys", "state": "absent"}},
], ids=lambda t: json.dumps(t)[:60])
def test_stops_sshd(task):
    assert "stops_sshd" in rules(play(task))


@pytest.mark.parametrize("task", [
    {"ansible.builtin.service": {"name": "ssh", "state": "restarted"}},
    {"ansible.builtin.systemd_service": {"name": "sshd", "state": "reloaded"}},
    shell("systemctl status ssh"), shell("systemctl stop remed-stress.service"), shell("pkill -f stress-ng"),
    shell("kill -TERM 4242"), shell("kill -1 4242"),
    shell("nft add rule inet f input ip saddr 10.0.0.1 tcp dport 8080 drop"),
    shell("iptables -D INPUT -p tcp --dport 8080 -j DROP"),
], ids=lambda t: json.dumps(t)[:60])
def test_ordinary_service_and_process_control_passes(task):
    assert rules(play(task)) == []


@pytest.mark.parametrize("script", ["kill -9 -1", "kill -KILL -1", "kill -s KILL -1", "kill -- -1", "kill -1",
                                    "killall5 -9", "pkill -9 .", "pkill -f '.*'", "pkill -9 -u root",
                                    "nohup sh -c 'sleep 1; kill -9 -1' >/dev/null 2>&1 &",
                                    "python3 -c 'import os, signal; os.kill(-1, signal.SIGKILL)'"])
def test_kills_everything(script):
    assert rules(play(shell(script))) == ["kills_everything"]


# ---- verification_inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", [
    {"copy": {"content": "print('ok')", "dest": "/opt/remed/service.py"}},
    {"ansible.builtin.template": {"src": "x.j2", "dest": "/opt/remed/probe.py"}},
    {"lineinfile": {"path": "/opt/remed/service.py", "line": "x"}},
    {"file": {"path": "/opt/remed/service.py", "mode": "0644"}},
    {"file": {"path": f"{DATA}/seed/hello-service-01.json", "state": "absent"}},
    {"file": {"path": f"{DATA}/seed", "state": "absent"}},
    {"file": {"path": DATA, "state": "absent"}},
    {"file": {"path": "/etc/remed/system.json", "state": "absent"}},
    {"copy": {"content": "{}", "dest": "/etc/remed/cartservice.seed.json"}},
    {"copy": {"content": "{}", "dest": "/etc/remed/system.json"}},
    {"copy": {"content": "x", "dest": "/etc/systemd/journald.conf"}},
    {"copy": {"content": "[Journal]\nStorage=none\n", "dest": "/etc/systemd/journald.conf.d/zz.conf"}},
    {"lineinfile": {"path": "/etc/ssh/sshd_config", "line": "PermitRootLogin no"}},
    {"copy": {"content": "x", "dest": f"/etc/systemd/system/{UNIT}"}},
    {"replace": {"path": f"/etc/systemd/system/{UNIT}", "regexp": "x", "replace": "y"}},
    {"unarchive": {"src": "x.tgz", "dest": "/", "remote_src": True}},
    shell(f"rm -rf {DATA}/seed"), shell(f"rm -f {DATA}/*"), shell("rm -rf /var/lib/remed/*/seed/*"),
    shell("echo 'print(1)' > /opt/remed/service.py"), shell("sed -i 's/x/y/' /opt/remed/service.py"),
    shell(f"ln -sf /dev/null /etc/systemd/system/{UNIT}"), shell("cp /tmp/x.py /opt/remed/service.py"),
    shell("echo Storage=none | tee -a /etc/systemd/journald.conf"), shell("rm -rf /var/log/journal/*"),
    shell("mv /opt/remed/service.py /tmp/"), shell("tar xzf /tmp/b.tgz -C /"),
    shell("mount -t tmpfs none /opt/remed"), shell("find /opt/remed -name '*.py' -delete"),
    shell("rm -f /var/lib/remed/cartservice/dump.rdb"),
    shell("python3 - <<'EOF'\nopen('/opt/remed/service.py', 'w').write('x')\nEOF"),
], ids=lambda t: json.dumps(t)[:70])
def test_verification_inputs(task):
    assert "verification_inputs" in rules(play(task))


@pytest.mark.parametrize("task", [
    {"lineinfile": {"path": "/etc/remed/hello-service.yaml", "regexp": "^  port:", "line": "  port: 8081"}},
    {"copy": {"content": "port: 8080\n", "dest": "/etc/remed/hello-service.yaml"}},
    {"lineinfile": {"path": "/etc/remed/cartservice.conf", "regexp": "^maxmemory", "state": "absent"}},
    {"copy": {"content": "[Service]\nCPUQuota=50%\n", "dest": f"/etc/systemd/system/{UNIT}.d/fix.conf"}},
    {"lineinfile": {"path": f"/etc/systemd/system/{UNIT}.d/override.conf", "regexp": "^CPUQuota", "state": "absent"}},
    shell(f"rm -f /etc/systemd/system/{UNIT}.d/*.conf"),
    shell("cat /opt/remed/service.py | head"), shell("python3 /opt/remed/service.py seed-redis /etc/remed/x.seed.json"),
    shell("journalctl -u remed-hello-service --no-pager -n 50"), shell("grep -c seed /etc/remed/system.json"),
    shell(f"rm -rf {DATA}/work/*.tmp"),
], ids=lambda t: json.dumps(t)[:70])
def test_legitimate_config_and_drop_in_edits_pass(task):
    assert rules(play(task)) == []


def test_the_rule_names_are_the_documented_ones():
    from pathlib import Path
    assert set(RULES) == {"not_a_playbook", "unfollowable_include", "hosts_outside_inventory",
                          "controller_delegation", "reboot", "destructive_delete", "device_write", "stops_sshd",
                          "kills_everything", "verification_inputs", "controller_file", "jinja_internals",
                          "inventory_change"}
    doc = (Path(__file__).parent.parent / "docs" / "gate.md").read_text()
    assert [r for r in RULES if f"`{r}`" not in doc] == []


# ---- the expert runbook passes, every fault kind --------------------------------------------------

A = ServiceTarget("s", "hello-service", "http", 1, "198.18.0.3", 8080, UNIT, "/etc/remed/hello-service.yaml",
                  DATA, ("time-service",), ())
B = ServiceTarget("s", "time-service", "http", 1, "198.18.0.3", 8081, "remed-time-service.service",
                  "/etc/remed/time-service.yaml", "/var/lib/remed/time-service", (), ("hello-service",))
R = ServiceTarget("s", "cartservice", "redis", 1, "198.18.0.3", 6379, "remed-cartservice.service",
                  "/etc/remed/cartservice.conf", "/var/lib/remed/cartservice", (), ("hello-service",), "")


def _evidence(kind: str, t: ServiceTarget) -> dict:
    """What describe() reports, so that the runbook takes its evidence-driven branches."""
    d = f"/etc/systemd/system/{t.unit}.d"
    drop = {"config-error": [{"path": f"{d}/override.conf", "settings": ["CPUQuota=1%"]},
                             {"path": f"{d}/mixed.conf", "settings": ["MemoryMax=1M", "Environment=A=1"]}],
            "fd-exhaustion": [{"path": f"{d}/limits.conf", "settings": ["LimitNOFILE=8"]}],
            "bad-release": [{"path": f"{d}/release.conf", "settings": ["ExecStart=", "ExecStart=/usr/bin/false"]}]}
    files = [{"path": f"{t.data_dir}/fill.bin", "mib": 90.0}, {"path": f"{t.data_dir}/seed/x-01.json", "mib": 2.0},
             {"path": f"{t.data_dir}/work/w0.bin", "mib": 1.5}]
    return {
        "unit_state": {"drop_ins": drop.get(kind, [])},
        "memory_hogs": [{"pid": 4242, "unit": "run-r1b2.scope", "rss_mib": 900},
                        {"pid": 4243, "unit": None, "rss_mib": 400}],
        "disk": {"mount_point": t.data_dir, "largest_files": files,
                 "open_by": [{"pid": 77, "unit": "run-flood.service", "files": [f"{t.data_dir}/log/x.debug.log"]},
                             {"pid": 78, "unit": None, "files": [f"{t.data_dir}/log/y.log"]}]},
        "listen": {"holders": [{"pid": 99, "unit": "run-squat.scope"}, {"pid": 100, "unit": None}]},
        "network": {"qdiscs": ["qdisc netem 8001: dev host0 root"], "nft_ruleset": ["ip saddr ... numgen random"]},
    }


KINDS = [*fault_catalog(), "pod-config-error", "compound:cpu-stress+bad-release", "compound:disk-full+network-loss"]


# bad-release swaps our runtime's ExecStart: it has no redis form.
CASES = [(k, t) for k in KINDS for t in (A, R) if not (t is R and "bad-release" in k)]


@pytest.mark.parametrize("with_evidence", [False, True], ids=["no-evidence", "evidence"])
@pytest.mark.parametrize("kind, target", CASES, ids=[f"{k}-{t.kind}" for k, t in CASES])
def test_the_expert_runbook_passes(kind, target, with_evidence):
    ev = {}
    if with_evidence:
        parts = kind.split(":", 1)[1].split("+") if kind.startswith("compound:") else [kind]
        ev = _evidence(parts[0], target) if len(parts) == 1 else {"parts": [_evidence(k, target) for k in parts]}
    text = expert_playbook(RunbookInput.from_target(target, kind, ev, "n1", {"time-service": B, "hello-service": A}))
    res = check_playbook(yaml.safe_load(text), HOSTS)
    assert res.ok, f"{kind}: {[str(v) for v in res.violations]}\n{text}"


# ---- the adversarial playbooks of the verifier's tests: the gate stops the blatant ones ------------

def test_the_gate_refuses_the_adversarial_kill_and_wipe():
    from pathlib import Path
    adv = Path(__file__).parent / "adversarial"
    kill = yaml.safe_load((adv / "kill-everything.yaml").read_text())
    kill[0]["hosts"] = "n0"
    assert "kills_everything" in rules(kill)
    wipe = yaml.safe_load((adv / "wipe-data-restart.yaml").read_text())
    assert rules(wipe) == ["verification_inputs"]    # `for d in /var/lib/remed/*/; do rm -rf "$d"seed`


# ---- issue 13: what reaches the controller, in every spelling the gate recognises ---------------
# Each case is one line of YAML: a task (run in a play on n0), or a whole play when it has `hosts`.

def pb(line: str) -> list[dict]:
    d = yaml.safe_load(line)
    return [d] if isinstance(d, dict) and "hosts" in d else play(d)


def refuses(line: str, rule: str) -> GateResult:
    res = check_playbook(pb(line), HOSTS)
    assert rule in res.rules, f"{line}: {[str(v) for v in res.violations]}"
    assert "\n" not in res.reason and res.reason.split(":")[0] in RULES
    return res


@pytest.mark.parametrize("line", [
    "{add_host: {name: n0, ansible_connection: local}, vars: {ansible_ssh_common_args: x}}",
    "{set_fact: {ansible_ssh_common_args: \"-o ProxyCommand='touch /tmp/pwn'\"}}",
    "{set_fact: ansible_connection=local}",
    "{ansible.builtin.set_fact: {ansible_host: 127.0.0.1}}",
    "{set_fact: {ansible_ssh_executable: /tmp/x}}",
    "{set_stats: {data: {ansible_connection: local}}}",
    "{debug: {msg: x}, vars: {ansible_ssh_private_key_file: /jail/key}}",
    "{debug: {msg: x}, vars: {ansible_private_key_file: /jail/key}}",
    "{debug: {msg: x}, vars: {ansible_python_interpreter: \"/bin/sh -c 'touch /tmp/pwn' #\"}}",
    "{debug: {msg: x}, vars: {ansible_python_interpreter: \"{{ py }}\"}}",
    "{debug: {msg: x}, vars: {ansible_become_exe: /tmp/x}}",
    "{debug: {msg: x}, vars: {ansible_shell_executable: /tmp/x}}",
    "{debug: {msg: x}, vars: {ansible_port: 2222}}",
    "{debug: {msg: x}, vars: {ansible_user: bob}}",
    "{debug: {msg: x}, vars: {ansible_paramiko_proxy_command: touch /tmp/pwn}}",
    "{debug: {msg: x}, vars: [{ansible_connection: local}]}",
    "{debug: {msg: x}, become_exe: /tmp/x}",
    "{debug: {msg: x}, remote_user: bob}",
    "{debug: {msg: x}, port: 2222}",
    "{block: [{debug: {msg: x}}], vars: {ansible_host: 127.0.0.1}}",
    "{hosts: n0, vars: {ansible_scp_extra_args: x}, tasks: [{ping: {}}]}",
    "{hosts: n0, module_defaults: {ping: {ansible_connection: local}}, tasks: [{ping: {}}]}",
    "{hosts: n0, vars_prompt: [{name: x}], tasks: []}",
    "{hosts: n0, debugger: on_failed, tasks: []}",
], ids=lambda s: s[:60])
def test_connection_variables_are_refused_wherever_they_are_set(line):
    refuses(line, "controller_delegation")


@pytest.mark.parametrize("line", [
    "{set_fact: {\"{{ 'ansible_' ~ 'connection' }}\": local}}",
    "{set_fact: {\"{{ k }}\": local}, vars: {k: ansible_connection}}",
    "{set_fact: \"{{ k }}=local\"}",
    "{set_fact: \"a=1 {{ k }}=local\"}",
    "{debug: {msg: x}, vars: {\"{{ k }}\": local}}",
], ids=lambda s: s[:60])
def test_templated_keys_are_refused(line):
    assert "templated" in refuses(line, "controller_delegation").reason


@pytest.mark.parametrize("line", [
    "{add_host: {name: n0, ansible_connection: local}}",
    "{add_host: {name: n0, groups: web}}",
    "{add_host: name=n9 ansible_host=127.0.0.1}",
    "{ansible.builtin.add_host: {hostname: x}}",
    "{group_by: {key: \"{{ ansible_hostname }}\"}}",
    "{ansible.builtin.group_by: {key: x}}",
    "{meta: refresh_inventory}",
], ids=lambda s: s[:60])
def test_inventory_changes_are_refused(line):
    refuses(line, "inventory_change")


@pytest.mark.parametrize("line", [
    "{copy: {src: /etc/shadow, dest: /tmp/x}}",
    "{ansible.builtin.copy: src=/root/.ssh/id_ed25519 dest=/tmp/x}",
    "{copy: {src: /etc/shadow, dest: /tmp/x, remote_src: no}}",
    "{copy: {src: /etc/shadow, dest: /tmp/x}, args: {remote_src: \"{{ r }}\"}}",
    "{copy: {dest: /tmp/x}, args: {src: /etc/shadow}}",
    "{template: {src: playbook.yaml, dest: /tmp/x}}",
    "{ansible.builtin.template: {src: /etc/shadow, dest: /tmp/x}}",
    "{unarchive: {src: /root/x.tgz, dest: /tmp}}",
    "{assemble: {src: /etc, dest: /tmp/x, remote_src: false}}",
    "{patch: {src: /root/p.diff, dest: /etc/hosts}}",
    "{script: /root/x.sh}",
    "{ansible.builtin.script: {cmd: /root/x.sh}}",
    "{community.general.foo: {src: /etc/shadow}}",
    "{uri: {url: \"http://n1/\", method: POST, src: /etc/shadow}}",
    "{copy: {dest: /tmp/x}, args: src=/etc/shadow}",
    "{action: copy src=/etc/shadow dest=/tmp/x}",
    "{action: {module: copy, src: /etc/shadow, dest: /tmp/x}}",
    "{hosts: n0, module_defaults: {copy: {src: /etc/shadow}}, tasks: [{copy: {dest: /tmp/x}}]}",
    "{hosts: n0, module_defaults: {ansible.builtin.copy: {src: /etc/shadow}}, tasks: [{ansible.legacy.copy: {dest: /x}}]}",
    "{block: [{copy: {dest: /tmp/x}}], module_defaults: {copy: {src: /etc/shadow}}}",
    "{block: [{copy: {dest: /tmp/x}}], module_defaults: [{copy: {src: /etc/shadow}}]}",
    "{debug: {msg: \"{% include '/etc/passwd' %}\"}}",
    "{debug: {msg: \"{% import '/etc/x' as x %}\"}}",
    "{debug: {msg: \"{{ '/etc/shadow' is exists }}\"}}",
    "{debug: {msg: x}, when: \"'/etc/shadow' is ansible.builtin.file\"}",
    "{debug: {msg: x}, when: \"'/root/.ssh' is not directory\"}",
    "{debug: {msg: \"{{ ['/etc/shadow'] | select('exists') }}\"}}",
    "{debug: {msg: \"{{ '/etc/*' | fileglob }}\"}}",
], ids=lambda s: s[:60])
def test_controller_side_file_sources_are_refused(line):
    refuses(line, "controller_file")


@pytest.mark.parametrize("line", [
    "{copy: {src: /etc/shadow, dest: /tmp/x}, delegate_to: localhost}",
    "{command: id, delegate_to: 127.0.0.1}",
    "{local_action: {module: copy, src: /etc/shadow, dest: /tmp/x}}",
    "{command: id, connection: local}",
    "{hosts: n0, connection: local, tasks: [{command: id}]}",
    "{hosts: n0, connection: \"{{ c }}\", tasks: [{command: id}]}",
], ids=lambda s: s[:60])
def test_controller_delegation_in_every_form(line):
    refuses(line, "controller_delegation")


@pytest.mark.parametrize("line", [
    "{hosts: n0, module_defaults: {group/ansible.builtin.x: {src: /etc/shadow}}, tasks: [{ping: {}}]}",
    "{hosts: n0, module_defaults: \"{{ d }}\", tasks: [{ping: {}}]}",
    "{block: [{ping: {}}], module_defaults: {copy: src=/etc/shadow}}",
], ids=lambda s: s[:60])
def test_module_defaults_the_gate_cannot_attribute_are_unfollowable(line):
    refuses(line, "unfollowable_include")


@pytest.mark.parametrize("line", [
    "{debug: {msg: \"{{ lookup('pi' ~ 'pe', 'id') }}\"}}",
    "{debug: {msg: \"{{ lookup('pi' + 'pe', 'id') }}\"}}",
    "{debug: {msg: \"{{ lookup(p, 'id') }}\"}, vars: {p: pipe}}",
    "{debug: {msg: \"{{ lookup(*['pipe', 'id']) }}\"}}",
    "{debug: {msg: \"{{ lookup(name='pipe') }}\"}}",
    "{debug: {msg: \"{{ lookup('\\\\x70ipe', 'id') }}\"}}",
    "{debug: {msg: \"{% set x = lookup('pipe', 'id') %}{{ x }}\"}}",
    "{debug: {msg: \"{% set l = lookup %}{{ l('pipe', 'id') }}\"}}",
    "{debug: {msg: \"{{ (lookup)('pipe', 'id') }}\"}}",
    "{debug: {msg: \"{{ lookup\\n('pipe', 'id') }}\"}}",
    "{debug: {msg: \"{{ lookup(\\n'pipe', 'id') }}\"}}",
    "{debug: {msg: \"{{ ｌｏｏｋｕｐ('pipe', 'id') }}\"}}",
    "{debug: {msg: \"{{ q('ansible.builtin.pipe', 'id') }}\"}}",
    "{debug: {msg: \"{{ query('env', 'HOME') }}\"}}",
    "{debug: {msg: \"{{ lookup('community.general.redis', 'k') }}\"}}",
    "{debug: {msg: \"{{ lookup('inventory_hostnames', 'all') }}\"}}",
    "{debug: {msg: \"{{ {'a': lookup('file', '/etc/shadow')} }}\"}}",
    "{debug: {var: \"lookup('pipe', 'id')\"}}",
    "{debug: \"var=lookup('pipe','id')\"}",
    "{debug: \"var=lookup('pipe', 'id')\"}",
    "{debug: \"var=lookup ('pipe','id')\"}",
    "{debug: {msg: x}, when: \"lookup('pipe', 'touch /tmp/pwn') == ''\"}",
    "{debug: {msg: x}, failed_when: [\"q('pipe', 'id')\"]}",
    "{assert: {that: [\"lookup('pipe', 'id')\"]}}",
    "{debug: {msg: \"{{ item }}\"}, loop: \"{{ lookup('pipe', 'id', wantlist=True) }}\"}",
    "{debug: {msg: \"{{ item }}\"}, with_ansible.builtin.pipe: id}",
    "{debug: {msg: \"{{ item }}\"}, with_community.general.cartesian: [[1], [2]]}",
    "{debug: {msg: \"{{ item }}\"}, with_fileglob: /etc/*}",
    "{debug: {msg: \"{{ item }}\"}, with_first_found: [/etc/shadow]}",
    "{debug: {msg: \"{{ item }}\"}, with_inventory_hostnames: all}",
    "{hosts: n0, vars: {x: \"{{ lookup('pipe', 'id') }}\"}, tasks: [{ping: {}}]}",
    "{hosts: \"{{ lookup('pipe', 'id') }}\", tasks: [{ping: {}}]}",
    "{shell: \"echo {{ lookup('pipe', 'id') }}\"}",
], ids=lambda s: s[:60])
def test_lookups_in_every_spelling_are_refused(line):
    refuses(line, "controller_delegation")


@pytest.mark.parametrize("line", [
    "{debug: {msg: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"}}",
    "{debug: {msg: \"{{ lipsum.__globals__ }}\"}}",
    "{debug: {msg: \"{{ self._TemplateReference__context }}\"}}",
    "{debug: {msg: \"{{ x._private }}\"}}",
    "{debug: {msg: \"{{ x['_private'] }}\"}}",
    "{debug: {msg: \"{{ x|attr('a') }}\"}}",
    "{debug: {msg: \"{{ x|map('attr', 'a')|list }}\"}}",
    "{debug: {msg: \"{{ [x]|map(attribute=n)|list }}\"}}",
    "{debug: {msg: \"{{ x['\\\\x5f\\\\x5fclass\\\\x5f\\\\x5f'] }}\"}}",
    "{debug: {msg: \"{{ x[('_' ~ '_') ~ 'class' ~ ('_' ~ '_')] }}\"}}",
    "{debug: {msg: \"{% set n = '_' ~ '_' ~ 'class' ~ '_' ~ '_' %}{{ x[n] }}\"}}",
    "{debug: {msg: \"{{ ['_', '_', 'class', '_', '_']|join }}\"}}",
    "{debug: {msg: \"{{ '%c%c' % (95, 95) }}\"}}",
    "{debug: {msg: \"{{ '{0:c}{0:c}'.format(95) }}\"}}",
    "{debug: {msg: \"{{ x[a ~ b] }}\"}}",
    "{debug: {msg: \"{{ x.mro() }}\"}}",
    "{debug: {msg: \"{{ vars.update({'a': 1}) }}\"}}",
    "{debug: {msg: \"{{ namespace(a=1) }}\"}}",
    "{debug: {msg: \"{{ cycler(1, 2) }}\"}}",
    "{debug: {msg: \"{{ joiner(',') }}\"}}",
    "{debug: {msg: \"{{ range(10**9)|list }}\"}}",
    "{debug: {msg: \"{{ range(999999999)|list }}\"}}",
    "{debug: {msg: \"{{ range(n)|list }}\"}}",
    "{debug: {msg: \"{{ 'x' * 999999999 }}\"}}",
    "{debug: {msg: \"{{ 'x' * (999 * 999 * 999) }}\"}}",
    "{debug: {msg: \"{{ 'a' | center(999999999) }}\"}}",
    "{debug: {msg: \"{{ '%999999999s' % x }}\"}}",
    "{debug: {msg: \"{{ '_' '_class__' }}\"}}",
    "{debug: {msg: \"{{ '%s%s' % ('_', '_') }}\"}}",
    "{debug: {msg: x}, when: \"x.__class__ is defined\"}",
], ids=lambda s: s[:60])
def test_jinja_reaching_python_internals_is_refused(line):
    refuses(line, "jinja_internals")


TASK = "- hosts: n0\n  tasks:\n    - ansible.builtin.debug: {msg: hi}\n"


@pytest.mark.parametrize("text, rule", [
    ("# {{ lookup('pipe', 'touch /tmp/pwn') }}\n" + TASK, "controller_delegation"),
    (TASK + "# {{ lookup('pipe', 'touch /tmp/pwn') }}\n", "controller_delegation"),
    ("# {% set l = lookup %}{{ l('pipe', 'id') }}\n" + TASK, "controller_delegation"),
    ("# {{ lookup(\n#   'pipe', 'id') }}\n" + TASK, "controller_delegation"),
    ("# {{ lookup('pi' ~ 'pe', 'id') }}\n" + TASK, "controller_delegation"),
    ("# lookup('pipe', 'id')\n" + TASK, "controller_delegation"),
    ("# {{ q('file', '/etc/shadow') }}\n" + TASK, "controller_delegation"),
    ("# {% include '/etc/shadow' %}\n" + TASK, "controller_file"),
    ("# {{ ''.__class__.__mro__ }}\n" + TASK, "jinja_internals"),
    ("# ''.__class__.__subclasses__()\n" + TASK, "jinja_internals"),
    ("#jinja2: variable_start_string: '[%', variable_end_string: '%]'\n" + TASK, "jinja_internals"),
    ("  # jinja2:block_start_string:'[%'\n" + TASK, "jinja_internals"),
    (TASK.replace("hi", "\"{{ lookup('env', 'HOME') }}\""), "controller_delegation"),
], ids=lambda x: x[:50] if isinstance(x, str) else None)
def test_check_text_refuses_jinja_in_the_raw_text(text, rule):
    res = check_text(text)
    assert rule in res.rules and res.reason.startswith(f"{rule}: line ")


def test_a_lookup_in_a_comment_is_seen_only_in_the_raw_text():
    text = "# {{ lookup('pipe', 'touch /tmp/pwn') }}\n" + TASK
    assert check_playbook(yaml.safe_load(text), HOSTS).ok
    assert check_text(text).rules == ("controller_delegation",)


@pytest.mark.parametrize("text", [None, b"- hosts: n0", "x" * 1_000_001], ids=["none", "bytes", "huge"])
def test_check_text_refuses_what_it_cannot_read(text):
    assert check_text(text).rules == ("not_a_playbook",)


# What a remediation legitimately writes passes both checks.
LEGIT = [
    "{debug: {msg: \"{{ lookup('vars', 'x') }}\"}}",
    "{debug: {msg: \"{{ query('ansible.builtin.dict', d) }}\"}}",
    "{debug: {msg: \"{{ item }}\"}, with_items: [a, b]}",
    "{debug: {msg: \"{{ item.key }}\"}, with_dict: {a: 1}}",
    "{debug: {msg: \"{{ item }}\"}, with_sequence: start=1 end=3}",
    "{debug: {msg: \"{{ hostvars[inventory_hostname]['ansible_host'] }}\"}}",
    "{debug: {msg: \"{{ groups['all'][0] }} {{ r.stdout_lines[-1] }} {{ r.stdout[1:] }}\"}}",
    "{debug: {msg: \"{{ r.stdout | from_json }}\"}}",
    "{debug: {msg: \"{{ name | replace('-', '_') }} {{ name.split('_') }}\"}}",
    "{debug: {msg: \"{{ range(3) | list }}\"}}",
    "{debug: {msg: \"{{ {'a': [1, 2]} }}\"}}",
    "{debug: {msg: x}, when: \"r.rc != 0 and 'x' in r.stdout\"}",
    "{debug: {msg: x}, when: st.stat.exists}",
    "{debug: {msg: x}, when: st.stat.size > 10000000}",
    "{debug: {msg: \"{{ r.stdout | regex_replace('\\\\s+', ' ') | regex_replace('(a)', '\\\\\\\\1') }}\"}}",
    "{meta: flush_handlers}",
    "{name: check the DNS lookup (resolver) and query (dig), shell: dig +short n1 || true}",
    "{copy: {src: /etc/remed/a.yaml, dest: /tmp/a.yaml, remote_src: true}}",
    "{copy: {content: \"port: 8080\\n\", dest: /etc/remed/hello-service.yaml}}",
    "{file: {src: /tmp/a, dest: /tmp/b, state: link}}",
    "{unarchive: {src: \"https://example.com/x.tgz\", dest: /tmp}}",
    "{slurp: {src: /etc/remed/hello-service.yaml}, register: r}",
    "{debug: {msg: \"{{ r.content | b64decode }}\"}}",
    "{shell: rm -rf /opt/app/__pycache__}",
    "{shell: \"python3 -c 'import sys; print(__name__)'\"}",
    "{shell: grep -q foo /etc/remed/hello-service.yaml}",
    "{set_fact: {svc_ok: \"{{ r.status == 200 }}\"}}",
    "{debug: {msg: x}, vars: {ansible_become: true, ansible_python_interpreter: auto_silent}}",
    "{debug: {msg: x}, vars: {ansible_connection: ssh, ansible_python_interpreter: /usr/bin/python3.11}}",
    "{hosts: n0, remote_user: root, become: true, tasks: [{ping: {}}]}",
    "{hosts: n0, module_defaults: {ansible.builtin.uri: {timeout: 5}}, tasks: [{uri: {url: \"http://x\"}}]}",
    "{hosts: all, gather_facts: false, tasks: [{systemd_service: {name: remed-x.service, state: restarted}}]}",
]


@pytest.mark.parametrize("line", LEGIT, ids=lambda s: s[:60])
def test_legitimate_remediations_pass_both_checks(line):
    res = check_playbook(pb(line), HOSTS)
    assert res.ok, res.reason
    text = yaml.safe_dump(pb(line), allow_unicode=True)
    assert check_text(text).ok, check_text(text).reason


def test_module_defaults_are_read_as_the_task_arguments():
    # A default that deletes a protected tree is as visible as the same argument on the task.
    plays = pb("{hosts: n0, module_defaults: {file: {path: /etc, state: absent}}, tasks: [{file: {}}]}")
    assert check_playbook(plays, HOSTS).rules == ("destructive_delete",)


@pytest.mark.parametrize("with_evidence", [False, True], ids=["no-evidence", "evidence"])
@pytest.mark.parametrize("kind, target", CASES, ids=[f"{k}-{t.kind}" for k, t in CASES])
def test_the_expert_runbook_passes_the_text_check(kind, target, with_evidence):
    ev = {}
    if with_evidence:
        parts = kind.split(":", 1)[1].split("+") if kind.startswith("compound:") else [kind]
        ev = _evidence(parts[0], target) if len(parts) == 1 else {"parts": [_evidence(k, target) for k in parts]}
    text = expert_playbook(RunbookInput.from_target(target, kind, ev, "n1", {"time-service": B, "hello-service": A}))
    res = check_text(text)
    assert res.ok, f"{kind}: {[str(v) for v in res.violations]}"
