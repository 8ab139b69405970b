"""The guest image: one recipe, cached by its hash, built atomically, two outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e_reme.host import mounts_below
from e2e_reme.vm_images import Recipe, RecipeError, find_image
from e2e_reme.vm_images.builder import DEFAULT_RECIPE, _remove_stale_builds

REMED = str(Path(sys.executable).parent / "remed")


def recipe_variant(tmp_path: Path, **changes) -> Recipe:
    data = yaml.safe_load(DEFAULT_RECIPE.read_text()) | changes
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return Recipe.load(p)


def test_the_hash_follows_the_recipe_and_nothing_else(tmp_path):
    same = recipe_variant(tmp_path)
    assert same.digest() == recipe_variant(tmp_path).digest()
    more = recipe_variant(tmp_path, packages=Recipe.load().packages + ("htop",))
    assert more.digest() != same.digest()


@pytest.mark.parametrize("changes, says", [
    ({"files": [{"src": "etc/nope.conf", "dest": "/etc/nope.conf"}]}, "file etc/nope.conf not found"),
    ({"files": [{"src": "etc/ssh/sshd_config.d/remed.conf"}]}, "needs 'src' and 'dest'"),
    ({"packages": None, "suite": None}, None),
])
def test_a_broken_recipe_is_refused_with_the_reason(tmp_path, changes, says):
    data = yaml.safe_load(DEFAULT_RECIPE.read_text()) | changes
    data = {k: v for k, v in data.items() if v is not None}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=says or "missing required key"):
        Recipe.load(p)


def test_the_image_has_both_outputs_and_its_manifest(image):
    assert (image.rootfs / "usr/sbin/sshd").exists() and (image.rootfs / "usr/bin/stress-ng").exists()
    assert image.disk.stat().st_size > 100e6
    assert image.kernel.stat().st_size > 1e6 and image.initrd.stat().st_size > 1e6
    assert (image.rootfs / "root/.ssh/authorized_keys").read_text() == \
        Path(str(image.ssh_key) + ".pub").read_text()
    for pkg in ("openssh-server", "python3", "redis-server", "stress-ng", "nftables", "iproute2"):
        assert pkg in image.manifest["packages"]
    info = json.loads(subprocess.run([REMED, "image", "info", "--json"], capture_output=True, text=True).stdout)
    assert info["built"] and info["current_hash"] == image.hash


def test_a_cached_build_is_reused_not_rebuilt(image):
    res = subprocess.run([REMED, "image", "build"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "cached" in res.stdout
    assert find_image().manifest["built_at"] == image.manifest["built_at"]


def test_an_interrupted_build_is_never_used_and_is_cleaned_up(tmp_path):
    env = os.environ | {"E2E_REME_CACHE": str(tmp_path)}
    proc = subprocess.Popen([REMED, "image", "build"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    images = tmp_path / "images"
    deadline = time.monotonic() + 60
    while not list(images.glob(".build-*/rootfs/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(images.glob(".build-*")), "the build should have started"
    os.killpg(proc.pid, signal.SIGKILL)   # the builder and debootstrap, mid-build
    proc.wait()
    time.sleep(0.5)
    os.environ["E2E_REME_CACHE"], old = str(tmp_path), os.environ.get("E2E_REME_CACHE")
    try:
        assert find_image() is None
        _remove_stale_builds(images)
        assert not list(images.glob(".build-*"))
        assert not mounts_below(tmp_path)
    finally:
        if old is None:
            del os.environ["E2E_REME_CACHE"]
        else:
            os.environ["E2E_REME_CACHE"] = old


def test_prune_removes_old_images_but_never_the_current_or_one_in_use(image, tmp_path, monkeypatch):
    monkeypatch.setenv("E2E_REME_CACHE", str(tmp_path))
    from e2e_reme.vm_images import prune_images
    from e2e_reme.vm_images.builder import images_dir
    current = Recipe.load().digest()
    for h in (current, "0ld0ld0ld0ld0ld0", "1n0use1n0use1n0u"):
        (images_dir() / h).mkdir(parents=True)
        (images_dir() / h / "manifest.json").write_text(json.dumps({"hash": h}))
    removed = prune_images(keep={"1n0use1n0use1n0u"})
    assert [p.name for p in removed] == ["0ld0ld0ld0ld0ld0"]
    assert sorted(p.name for p in images_dir().iterdir()) == sorted([current, "1n0use1n0use1n0u"])
