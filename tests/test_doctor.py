"""`remed doctor`: every capability is probed for real and reported with a verdict; the
backends and fault mechanisms follow from the checks; the doctor never crashes and never
leaves a scratch network namespace behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from e2e_reme.simulators.sandbox import doctor
from e2e_reme.simulators.sandbox.doctor import (BACKENDS, CHECK_NAMES, MECHANISMS, STATUSES, Check,
                                        HostReport, probe_host)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network-namespace probes need root")


@pytest.fixture(scope="module")
def report() -> HostReport:
    return probe_host()


def _probe_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines()
            if line.startswith(doctor.PROBE_NETNS_PREFIX)}


def _direct_netns_probe(cmd: list[str], stdin: str | None = None) -> bool:
    """The same question the doctor asks, asked independently of its code."""
    ns = f"{doctor.PROBE_NETNS_PREFIX}{os.getpid()}-test"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True,
                           text=True)
        return r.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)


def _cli() -> typer.Typer:
    # The real `remed` app imports every command module; this one holds only the doctor.
    app = typer.Typer()
    from e2e_reme.cli.doctor import doctor as doctor_command
    app.command("doctor")(doctor_command)
    app.command("noop")(lambda: None)  # a second command keeps `doctor` a subcommand
    return app


# ---- the report -------------------------------------------------------------------------

def test_every_capability_is_reported_once_with_a_valid_status(report):
    names = [c.name for c in report.checks]
    assert sorted(names) == sorted(CHECK_NAMES)
    for c in report.checks:
        assert c.status in STATUSES, c
        assert c.detail, f"{c.name} has no detail"


def test_every_check_that_is_not_ok_says_how_to_fix_it(report):
    for c in report.checks:
        if c.status in ("missing", "unusable"):
            assert c.fix, f"{c.name} is {c.status} but names no fix"


def test_root_check_matches_the_effective_uid(report):
    assert (report.check("root").status == "ok") == (os.geteuid() == 0)


def test_dev_kvm_presence_is_its_own_line(report):
    assert (report.check("/dev/kvm").status != "missing") == os.path.exists("/dev/kvm")


@needs_root
def test_netem_verdict_agrees_with_a_direct_tc_probe(report):
    works = _direct_netns_probe(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    assert report.check("netem").status == ("ok" if works else "unusable")


@needs_root
def test_nftables_verdict_agrees_with_a_direct_numgen_rule(report):
    rules = ("table inet t {\n chain c {\n  type filter hook output priority 0;\n"
             "  numgen random mod 100 < 50 drop\n }\n}\n")
    works = _direct_netns_probe(["nft", "-f", "-"], stdin=rules)
    assert report.check("nftables").status == ("ok" if works else "unusable")


def test_cgroup_layout_matches_the_mount_on_sys_fs_cgroup(report):
    fstype = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True,
                            text=True).stdout.strip()
    detail = report.check("cgroup").detail
    assert detail.startswith("v2") == (fstype == "cgroup2fs"), (fstype, detail)


def test_disk_checks_name_where_they_measured(report, tmp_path, monkeypatch):
    monkeypatch.setenv("E2E_REME_CACHE", str(tmp_path / "not" / "yet" / "made"))
    c = probe_host().check("disk:cache")
    assert c.status in ("ok", "unusable")
    assert f"nearest existing: {tmp_path}" in c.detail


def test_guest_image_check_agrees_with_find_image(report):
    from e2e_reme.vm_images import find_image
    img = find_image()
    c = report.check("guest-image")
    if img is None:
        assert c.status == "missing"
    else:
        assert c.status == "ok" and img.hash in c.detail


# ---- scratch namespaces ---------------------------------------------------------------------

@needs_root
def test_probing_leaves_no_namespace_behind():
    before = _probe_namespaces()
    probe_host()
    assert _probe_namespaces() <= before


@needs_root
def test_a_probe_failing_inside_its_namespace_still_deletes_it(monkeypatch):
    seen_alive = []

    def broken(ns, cmd, **kw):
        seen_alive.append(ns in _probe_namespaces())
        raise RuntimeError("injected failure")

    monkeypatch.setattr(doctor, "_ns_run", broken)
    before = _probe_namespaces()
    r = probe_host()
    assert r.check("netem").status == "unknown"
    assert r.check("nftables").status == "unknown"
    assert seen_alive == [True, True]  # the failures really happened inside a namespace
    assert _probe_namespaces() <= before


@needs_root
def test_a_namespace_left_by_a_killed_doctor_is_removed_by_the_next_probe():
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = f"{doctor.PROBE_NETNS_PREFIX}{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        probe_host()
        assert orphan not in _probe_namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", orphan], capture_output=True)


# ---- failures become data ---------------------------------------------------------------------

def test_a_probe_that_raises_becomes_an_unknown_check_with_the_error(monkeypatch):
    def boom():
        raise OSError("injected: /proc is gone")

    monkeypatch.setattr(doctor, "probe_netem", boom)
    c = probe_host().check("netem")
    assert c.status == "unknown"
    assert "injected: /proc is gone" in c.detail


def test_every_probe_raising_still_yields_a_full_report(monkeypatch):
    def boom(*args):
        raise RuntimeError("injected")

    for name in dir(doctor):
        if name.startswith("probe_") and name != "probe_host":
            monkeypatch.setattr(doctor, name, boom)
    r = probe_host()
    assert {c.name for c in r.checks} == set(CHECK_NAMES)
    assert all(c.status == "unknown" for c in r.checks)
    assert not any(u.usable for u in r.backends.values())


def test_kvm_is_unknown_when_the_kvm_module_cannot_be_imported(monkeypatch):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("without /dev/kvm the doctor does not consult the KVM probe")
    monkeypatch.setitem(sys.modules, "e2e_reme.simulators.sandbox.kvm", None)  # import now fails
    assert probe_host().check("kvm").status == "unknown"


def test_check_rejects_a_status_outside_the_vocabulary():
    with pytest.raises(ValueError):
        Check("x", "fine", "detail")


# ---- derived verdicts ----------------------------------------------------------------------

def _checks(**status: str) -> list[Check]:
    """Every check ok unless named (names with '-' or ':' spelt with '_')."""
    by_key = {n.replace("-", "_").replace(":", "_").strip("/").replace("/", "_"): n
              for n in CHECK_NAMES}
    out = {n: Check(n, "ok", "fine") for n in CHECK_NAMES}
    for key, s in status.items():
        out[by_key[key]] = Check(by_key[key], s, f"{key} is {s}", "do something")
    return list(out.values())


def test_host_without_netem_keeps_netem_for_libvirt_only():
    r = HostReport.from_checks(_checks(netem="unusable"))
    assert not r.usable("netem", "nspawn")
    assert "netem is unusable" in r.mechanisms["netem"]["nspawn"].why
    assert r.usable("netem", "libvirt")
    assert r.usable("nftables", "nspawn") and r.usable("nftables", "libvirt")


def test_host_without_nftables_keeps_nftables_for_libvirt_only():
    r = HostReport.from_checks(_checks(nftables="unusable"))
    assert not r.usable("nftables", "nspawn")
    assert r.usable("nftables", "libvirt")


def test_nspawn_needs_root_nspawn_and_overlay():
    for missing in ("root", "systemd_nspawn", "overlayfs"):
        r = HostReport.from_checks(_checks(**{missing: "missing"}))
        assert not r.backends["nspawn"].usable, missing
        assert f"{missing} is missing" in r.backends["nspawn"].why
        assert not any(r.usable(m, "nspawn") for m in MECHANISMS)


def test_libvirt_needs_libvirtd_and_qemu_but_not_kvm():
    for missing in ("libvirtd", "qemu"):
        r = HostReport.from_checks(_checks(**{missing: "unusable"}))
        assert not r.backends["libvirt"].usable, missing
        assert r.backends["nspawn"].usable
    r = HostReport.from_checks(_checks(kvm="unusable"))
    assert r.backends["libvirt"].usable and "TCG" in r.backends["libvirt"].why
    r = HostReport.from_checks(_checks())
    assert "KVM" in r.backends["libvirt"].why


def test_cgroup_limits_and_stress_follow_the_backends():
    r = HostReport.from_checks(_checks())
    assert all(r.usable("cgroup_stress", b) for b in BACKENDS)


def test_this_hosts_mechanisms_follow_from_its_checks(report):
    rebuilt = HostReport.from_checks(report.checks)
    assert rebuilt.backends == report.backends
    assert rebuilt.mechanisms == report.mechanisms
    assert report.usable("netem", "nspawn") == (
        report.backends["nspawn"].usable and report.check("netem").status == "ok")


# ---- the command ------------------------------------------------------------------------------

def test_json_output_parses_and_has_checks_backends_and_mechanisms():
    res = CliRunner().invoke(_cli(), ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {c["name"] for c in data["checks"]} == set(CHECK_NAMES)
    assert set(data["backends"]) == set(BACKENDS)
    for b in data["backends"].values():
        assert isinstance(b["usable"], bool) and b["why"]
    assert set(data["mechanisms"]) == set(MECHANISMS)
    for per in data["mechanisms"].values():
        assert set(per) == set(BACKENDS)


def test_table_output_lists_every_check_and_exits_0_even_when_things_are_missing(monkeypatch):
    from e2e_reme.cli._common import console
    monkeypatch.setattr(console, "width", 250)  # so no check name is wrapped
    monkeypatch.setattr(doctor, "probe_libvirtd", lambda: Check("libvirtd", "missing", "gone", "x"))
    res = CliRunner().invoke(_cli(), ["doctor"])
    assert res.exit_code == 0, res.output
    for name in CHECK_NAMES:
        assert name in res.stdout
    for title in ("Sandbox backends", "Fault mechanisms", *MECHANISMS):
        assert title in res.stdout
