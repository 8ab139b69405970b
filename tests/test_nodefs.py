"""nodefs.NodeTree: the host reads a tree the node controls without ever leaving it.

The node is played here by a thread that swaps directories for links while the host
reads, and by special files left where regular ones were; the episode-level cases (a
process in a real node doing the same during the verdict) are in test_hostile_node.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from e2e_reme.simulators.sandbox.nodefs import NodeTree, WalkLimits

SECRET = b"host secret 7f3a\n"


@pytest.fixture
def host_secret(tmp_path):
    d = tmp_path / "host"
    d.mkdir()
    (d / "passwd").write_bytes(SECRET)
    return d


def _swapper(root, host_dir, stop):
    """Swap root/etc between a real directory and a link to the host's directory."""
    real, tmp = root / "etc", root / "etc.real"
    while not stop.is_set():
        try:
            os.rename(real, tmp)
            os.symlink(host_dir, real)
            os.unlink(real)
            os.rename(tmp, real)
        except OSError:
            pass


@pytest.mark.parametrize("in_root", [True, False])
def test_a_directory_swapped_for_a_host_link_mid_read_never_yields_a_host_byte(tmp_path, host_secret, in_root):
    root = tmp_path / "node"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"node's own\n")
    stop = threading.Event()
    t = threading.Thread(target=_swapper, args=(root, host_secret, stop), daemon=True)
    t.start()
    seen, deadline = set(), time.monotonic() + 2.0
    try:
        with NodeTree(root, in_root=in_root) as tree:
            while time.monotonic() < deadline:
                seen.add(tree.read_bytes("/etc/passwd"))
                for full, _st in tree.walk("/"):
                    seen.add(tree.read_entry(full, 1 << 16))
    finally:
        stop.set()
        t.join()
    assert SECRET not in seen
    assert b"node's own\n" in seen          # the reads did happen, between swaps


def test_absolute_links_resolve_inside_a_node_root_and_not_at_all_in_a_layer(tmp_path, host_secret):
    root = tmp_path / "node"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"node's own\n")
    os.symlink(str(host_secret / "passwd"), root / "abs")       # the host's path, read as the node's
    os.symlink("/etc/passwd", root / "rel")
    with NodeTree(root, in_root=True) as tree:
        assert tree.read_bytes("/abs") is None                      # no such file inside the node
        assert tree.read_bytes("/rel") == b"node's own\n"
        assert tree.read_bytes("/../../../../" + str(host_secret / "passwd")) is None
    with NodeTree.layer(root) as layer:
        assert layer.read_bytes("/rel") is None                     # a layer's links are never followed
        assert layer.readlink("/rel") == "/etc/passwd"


def test_special_files_are_never_opened_and_nothing_blocks(tmp_path):
    root = tmp_path / "node"
    root.mkdir()
    os.mkfifo(root / "fifo")                                        # opening it for reading would block
    os.symlink("/dev/kmsg", root / "kmsg")                          # a kernel log device, blocking reads
    os.mknod(root / "null", 0o600 | 0o020000, os.makedev(1, 3))     # a character device
    t0 = time.monotonic()
    with NodeTree(root, in_root=False) as tree:
        entries = dict(tree.walk("/"))
        assert set(entries) == {"/fifo", "/kmsg", "/null"}
        assert all(tree.read_entry(p, 100) is None for p in entries)
        assert tree.sha256("/fifo") is None
    with NodeTree(root, in_root=True) as tree:
        assert tree.read_bytes("/kmsg") is None                     # /dev/kmsg inside the node: none here
    assert time.monotonic() - t0 < 2


def test_a_deep_tree_is_walked_without_recursion_and_bounded(tmp_path):
    root = tmp_path / "node"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):                                            # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    with NodeTree(root, in_root=False) as tree:
        n = sum(1 for _ in tree.walk("/", WalkLimits(max_depth=10_000)))
        assert n == 3000 and tree.truncated is None
        n = sum(1 for _ in tree.walk("/", WalkLimits(max_depth=50)))
        assert n == 50 and "deeper than 50" in tree.truncated
        n = sum(1 for _ in tree.walk("/", WalkLimits(max_entries=10)))
        assert n == 10 and "more than 10 entries" in tree.truncated
    subprocess.run(["rm", "-rf", str(root)], check=True)    # pytest's own cleanup recurses


def test_reads_are_bounded_in_bytes(tmp_path):
    root = tmp_path / "node"
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 40)                                           # 1 TiB, no blocks
    with NodeTree(root, in_root=True) as tree:
        assert len(tree.read_bytes("/sparse", limit=1000)) == 1000
