"""Build the guest image from `recipe.yaml`, once per recipe hash.

One build makes both outputs the sandboxes need:

    <cache>/images/<hash>/
        rootfs/          the Debian tree systemd-nspawn boots (through a per-node overlay)
        disk.qcow2       the same tree as an ext4 disk, for libvirt (backing file of overlays)
        vmlinuz, initrd.img   the guest's kernel, for libvirt direct-kernel boot
        ssh/id_ed25519   the image's own key; its public half is root's authorized_keys
        manifest.json    hash, packages, sizes, build time; written last

A build happens in `<cache>/images/.build-<hash>-<pid>` and is renamed into place only
when complete, so an interrupted build is never used (the next build deletes it).
Builds of the same hash are serialised by a lock file; a cache hit reads one manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from e2e_reme import paths
from e2e_reme.host import HostCommandError, process_alive, run, safe_rmtree

from .errors import BuildError, ImageNotBuilt, RecipeError

# Bump when the build procedure changes in a way that changes the output.
BUILDER_VERSION = 2
HERE = Path(__file__).resolve().parent
DEFAULT_RECIPE = HERE / "recipe.yaml"
FILES_DIR = HERE / "files"

Progress = Callable[[str, str], None]
"""progress(step, detail): called as the build moves on; the CLI draws it."""


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    suite: str
    variant: str
    mirror: str
    packages: tuple[str, ...]
    hostname: str
    users: tuple[dict, ...]
    files: tuple[dict, ...]
    enable: tuple[str, ...]
    disable: tuple[str, ...]
    mask: tuple[str, ...]
    disk_size: str
    cmdline: str
    extra_hash_inputs: tuple[Path, ...] = field(default=())
    canonical: str = ""   # the parsed recipe as sorted JSON: what the hash covers (comments don't count)

    @classmethod
    def load(cls, path: Path | None = None) -> "Recipe":
        path = Path(path or DEFAULT_RECIPE)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise RecipeError(f"recipe {path}: cannot read it ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path}: expected a mapping at the top")
        for key in ("suite", "packages"):
            if key not in data:
                raise RecipeError(f"recipe {path}: missing required key '{key}'")
        files = tuple(data.get("files") or ())
        for f in files:
            if not {"src", "dest"} <= set(f):
                raise RecipeError(f"recipe {path}: file entry {f} needs 'src' and 'dest'")
            src = FILES_DIR / f["src"]
            if not src.exists():
                raise RecipeError(f"recipe {path}: file {f['src']} not found under {FILES_DIR}")
        services = data.get("services") or {}
        vm = data.get("vm") or {}
        return cls(
            path=path,
            name=data.get("name", "remed-guest"),
            suite=data["suite"],
            variant=data.get("variant", "minbase"),
            mirror=os.environ.get("E2E_REME_MIRROR") or data.get("mirror", "http://deb.debian.org/debian"),
            packages=tuple(data["packages"]),
            hostname=data.get("hostname", "remed-guest"),
            users=tuple(data.get("users") or ()),
            files=files,
            enable=tuple(services.get("enable") or ()),
            disable=tuple(services.get("disable") or ()),
            mask=tuple(services.get("mask") or ()),
            disk_size=str(vm.get("disk_size", "4G")),
            cmdline=vm.get("cmdline", "root=/dev/vda rw console=ttyS0"),
            extra_hash_inputs=tuple(Path(p) for p in data.get("extra_hash_inputs") or ()),
            canonical=json.dumps({k: v for k, v in data.items() if k != "mirror"}, sort_keys=True),
        )

    def digest(self) -> str:
        """sha256 of everything that shapes the image: the recipe's content, the files it
        installs, and the builder's version. The mirror is not part of it (same packages)."""
        h = hashlib.sha256()
        h.update(f"builder={BUILDER_VERSION}\n".encode())
        h.update(self.canonical.encode())
        for f in sorted(self.files, key=lambda f: f["dest"]):
            src = FILES_DIR / f["src"]
            h.update(f"{f['dest']} {f.get('mode', '')}\n".encode())
            h.update(_tree_bytes(src))
        for p in self.extra_hash_inputs:
            h.update(_tree_bytes(p if p.is_absolute() else HERE.parent / p))
        return h.hexdigest()[:16]


def _tree_bytes(p: Path) -> bytes:
    if p.is_dir():
        return b"".join(c.relative_to(p).as_posix().encode() + c.read_bytes()
                        for c in sorted(p.rglob("*")) if c.is_file())
    return p.read_bytes()


@dataclass(frozen=True)
class Image:
    """A built image in the cache. Paths are absolute; nothing here is ever modified."""

    dir: Path
    manifest: dict

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def ssh_key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def cmdline(self) -> str:
        return self.manifest["cmdline"]


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def find_image(recipe: Recipe | None = None) -> Image | None:
    """The image for this recipe (default: the project's) if it is built, else None."""
    recipe = recipe or Recipe.load()
    d = images_dir() / recipe.digest()
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return Image(d, manifest)


def require_image(recipe: Recipe | None = None) -> Image:
    img = find_image(recipe)
    if img is None:
        raise ImageNotBuilt(
            f"no guest image for the current recipe in {images_dir()}; run `remed image build`")
    return img


def list_images() -> list[Image]:
    out = []
    for m in sorted(images_dir().glob("*/manifest.json")):
        try:
            out.append(Image(m.parent, json.loads(m.read_text())))
        except (OSError, ValueError):
            continue
    return out


def prune_images(keep: set[str] = frozenset(), recipe: Recipe | None = None) -> list[Path]:
    """Delete cached images other than the current recipe's and those in `keep` (hashes
    still used by live sandboxes); return what was deleted."""
    current = (recipe or Recipe.load()).digest()
    removed = []
    for img in list_images():
        if img.hash != current and img.hash not in keep:
            safe_rmtree(img.dir)
            for leftover in images_dir().glob(f"{img.hash}.*"):
                leftover.unlink(missing_ok=True)
            removed.append(img.dir)
    return removed


def build_image(recipe: Recipe | None = None, *, force: bool = False,
                progress: Progress | None = None) -> Image:
    """Return the image for `recipe`, building it if it is not cached (or if `force`)."""
    recipe = recipe or Recipe.load()
    say = progress or (lambda step, detail: None)
    if os.geteuid() != 0:
        raise BuildError("building the image needs root (debootstrap, mkfs); run it with sudo")
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` is not installed; run `make setup` (or apt-get install it)")
    digest = recipe.digest()
    root = images_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / digest
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = find_image(recipe)
        if existing and not force:
            say("cached", str(final))
            return existing
        _remove_stale_builds(root)
        work = root / f".build-{digest}-{os.getpid()}"
        safe_rmtree(work)
        work.mkdir()
        try:
            manifest = _build(recipe, digest, work, root / f"{digest}.build.log", say)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
            os.sync()
            if final.exists():
                trash = root / f".old-{digest}-{os.getpid()}"
                final.rename(trash)
                safe_rmtree(trash)
            work.rename(final)
        except BaseException:
            safe_rmtree(work)
            raise
    say("done", str(final))
    return Image(final, manifest)


def _remove_stale_builds(root: Path) -> None:
    """Delete build directories left by interrupted builds (their builder is dead)."""
    for d in root.glob(".build-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and process_alive(int(pid))):
            safe_rmtree(d)
    for d in root.glob(".old-*"):
        safe_rmtree(d)


def _build(recipe: Recipe, digest: str, work: Path, log: Path, say: Progress) -> dict:
    t0 = time.monotonic()
    rootfs = work / "rootfs"
    log.write_text("")  # kept outside the build dir so that it outlives a failed build
    debs = paths.cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    say("debootstrap", f"{recipe.suite} {recipe.variant}, {len(recipe.packages)} packages")
    _stream(["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
             f"--cache-dir={debs}", recipe.suite, str(rootfs), recipe.mirror],
            log, "debootstrap", say)
    t_boot = time.monotonic() - t0

    say("configure", "users, files, services")
    _configure(recipe, rootfs, work)

    say("kernel", "copying the guest kernel and initrd")
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError(f"no kernel in {rootfs}/boot; is linux-image-amd64 in the recipe? see {log}")
    kver = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{kver}"
    if not initrd.exists():
        raise BuildError(f"no initrd for kernel {kver} in {rootfs}/boot; see {log}")
    shutil.copy2(kernels[-1], work / "vmlinuz")
    shutil.copy2(initrd, work / "initrd.img")

    say("disk", f"ext4 {recipe.disk_size} → qcow2")
    raw = work / "disk.raw"
    _checked(["mkfs.ext4", "-q", "-F", "-L", "remedroot", "-d", str(rootfs), str(raw), recipe.disk_size],
             log, "mkfs.ext4")
    _checked(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")], log, "qemu-img")
    raw.unlink()

    say("manifest", "recording packages")
    pkgs = run(["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"]).stdout
    return {
        "hash": digest,
        "name": recipe.name,
        "suite": recipe.suite,
        "builder_version": BUILDER_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 1),
        "debootstrap_seconds": round(t_boot, 1),
        "kernel_version": kver,
        "cmdline": recipe.cmdline,
        "packages": dict(line.split(" ", 1) for line in pkgs.splitlines() if " " in line),
        "rootfs_bytes": _du(rootfs),
        "disk_bytes": (work / "disk.qcow2").stat().st_size,
    }


def _configure(recipe: Recipe, rootfs: Path, work: Path) -> None:
    (rootfs / "etc/hostname").write_text(recipe.hostname + "\n")
    (rootfs / "etc/hosts").write_text(
        f"127.0.0.1 localhost\n127.0.1.1 {recipe.hostname}\n::1 localhost ip6-localhost\n")
    for f in recipe.files:
        dest = rootfs / f["dest"].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = FILES_DIR / f["src"]
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
            if "mode" in f:
                dest.chmod(int(str(f["mode"]), 8))
    keydir = work / "ssh"
    keydir.mkdir()
    key = keydir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"remed-image-{recipe.digest()}", "-f", str(key)])
    pub = (keydir / "id_ed25519.pub").read_text()
    for user in recipe.users:
        if not user.get("ssh_key"):
            continue
        home = rootfs / ("root" if user["name"] == "root" else f"home/{user['name']}")
        if user["name"] != "root":
            run(["chroot", str(rootfs), "useradd", "-m", "-s", "/bin/bash", user["name"]])
        sshdir = home / ".ssh"
        sshdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (sshdir / "authorized_keys").write_text(pub)
        (sshdir / "authorized_keys").chmod(0o600)
        if user["name"] != "root":
            run(["chroot", str(rootfs), "chown", "-R", f"{user['name']}:", f"/home/{user['name']}/.ssh"])
    for verb, units in (("enable", recipe.enable), ("disable", recipe.disable), ("mask", recipe.mask)):
        if units:
            run(["systemctl", f"--root={rootfs}", verb, *units])
    # Package caches are large and useless inside a sandbox with no network.
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / d).glob("*"):
            if p.is_file():
                p.unlink()
    for stale in (rootfs / "boot").glob("initrd.img-*.dpkg-bak"):
        stale.unlink()


def _stream(cmd: list[str], log: Path, step: str, say: Progress) -> None:
    """Run a long command, appending to the log and reporting its latest line."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.startswith("I: "):
                    say(step, line[3:].strip()[:80])
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["?"]
        raise BuildError(f"{step} failed (exit {rc}): {tail[0]}; full log: {log}")


def _checked(cmd: list[str], log: Path, step: str) -> None:
    try:
        p = run(cmd, timeout=900)
    except HostCommandError as e:
        raise BuildError(f"{step} failed: {e}; log: {log}") from e
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")


def _du(p: Path) -> int:
    try:
        return int(run(["du", "-sb", "--one-file-system", str(p)]).stdout.split()[0])
    except (HostCommandError, ValueError, IndexError):
        return 0
