"""A container's filesystem without a container: everything read-only but one data directory.

Run as the first process of fresh mount and PID namespaces (``unshare --mount --pid --fork
--mount-proc``, see :func:`sandbox_argv`), this script

1. (when it is to drop to another uid) makes each path the service needs reachable for that uid,
   by laying a small tmpfs over any ancestor directory the uid could not enter (``/root`` is 0700
   on machines whose Python lives in ``/root/.pyenv``) that leads only to the wanted path;
2. puts a fresh private tmpfs on ``/dev/shm`` (as Docker and Kubernetes give a container);
3. bind-mounts the data directory on itself, then remounts every other mount read-only, except
   ``/proc``, ``/sys`` and ``/dev`` (the container runtime's own, writable there too);
4. drops to the uid/gid (no supplementary groups, so no capability is left) and execs the command.

``--join PID`` instead enters the mount and PID namespaces of a running sandbox (whose PID 1 is
``PID`` as this host sees it), drops privileges the same way and runs the command there, like
``docker exec``: how the tests run ``cvat-hooks healthcheck`` and a write probe inside.

Nothing outside the new namespaces changes: the mounts are private to them and vanish with them.
Only Linux; needs ``unshare`` (util-linux) and either root or unprivileged user namespaces.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import stat
import sys
from pathlib import Path

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 21, 1 << 24
MNT_DETACH = 2
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER = 0x00020000, 0x20000000, 0x10000000

RUNTIME_MOUNTS = ("/proc", "/sys", "/dev")
"""Mount trees a container runtime provides itself (writable in a read-only container too)."""

# Flags a remount must repeat: inside a user namespace the kernel refuses to clear them (EPERM).
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: Path, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2), raising ``OSError`` naming the target."""
    _check(_libc.mount(source.encode(), str(target).encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def umount(target: Path) -> None:
    _check(_libc.umount2(str(target).encode(), MNT_DETACH), f"umount {target}")


def mounts() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of the visible mounts of this namespace, in mount order.

    Of mounts stacked on one point only the last (the top one) is visible, and so counts.
    """
    found: dict[str, set[str]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        # Octal escapes (\040 for a space) in the path; fields[5] are the per-mount options.
        point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
        found.pop(point, None)
        found[point] = set(fields[5].split(","))
    return list(found.items())


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def can_enter(directory: Path, uid: int, gid: int) -> bool:
    """Whether ``uid:gid`` (no other groups) may traverse ``directory``."""
    st = directory.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


class Exposer:
    """Makes paths reachable for a uid by laying a tmpfs over each ancestor it cannot enter, then
    grafting back (from a copy of the original tree) only the children that lead to wanted paths."""

    def __init__(self, stage: Path, uid: int, gid: int) -> None:
        self.original = stage / "original"
        self.original.mkdir()
        mount("/", self.original, flags=MS_BIND | MS_REC)  # the tree as it was, before any cover
        self.uid, self.gid = uid, gid
        self.covered: set[Path] = set()

    def expose(self, target: Path) -> None:
        parts = target.parts
        for depth in range(1, len(parts)):
            directory, child = Path(*parts[:depth]), Path(*parts[:depth + 1])
            if directory not in self.covered:
                if can_enter(directory, self.uid, self.gid):
                    continue
                mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
                self.covered.add(directory)
            if not os.path.lexists(child):
                self._graft(child)

    def _graft(self, child: Path) -> None:
        source = self.original / child.relative_to("/")
        if source.is_dir():
            child.mkdir()
        else:
            child.touch()
        mount(str(source), child, flags=MS_BIND | MS_REC)

    def close(self) -> None:
        umount(self.original)


def make_read_only(keep_writable: tuple[str, ...]) -> list[str]:
    """Remount every mount read-only but the runtime's and ``keep_writable``; the points changed."""
    changed = []
    for point, options in mounts():
        if under(point, RUNTIME_MOUNTS) or point in keep_writable or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name, flag in _KEPT_FLAGS.items():
            if name in options:
                flags |= flag
        try:
            mount("none", Path(point), flags=flags)
        except FileNotFoundError:
            continue  # hidden under a tmpfs laid by Exposer: nothing can reach it
        changed.append(point)
    left = [p for p, o in mounts() if "ro" not in o and not under(p, RUNTIME_MOUNTS) and p not in keep_writable]
    if left:
        raise SystemExit(f"readonly_sandbox: still writable: {left}")
    return changed


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid:gid`` with no supplementary groups (a uid change from 0 clears capabilities)."""
    if uid is None:
        return
    os.setgroups([])
    os.setgid(gid if gid is not None else uid)
    os.setuid(uid)


def build(args: argparse.Namespace) -> None:
    """Steps 1-3 of the module docstring, in this process's (new) mount namespace."""
    data = Path(args.data).resolve()
    shm = Path("/dev/shm")
    mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")  # our own, also the staging area
    if args.uid is not None and args.uid != 0:
        exposer = Exposer(shm, args.uid, args.gid if args.gid is not None else args.uid)
        for path in [*args.expose, str(data)]:
            exposer.expose(Path(path).resolve())
        exposer.close()
    umount(shm)
    mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount(str(data), data, flags=MS_BIND)
    make_read_only(keep_writable=(str(data),))


def join(pid: int) -> None:
    """Enter the namespaces of the sandbox whose PID 1 is ``pid`` on this host (its user namespace
    first when it has its own: the one that may enter the others)."""
    kinds = [("mnt", CLONE_NEWNS), ("pid", CLONE_NEWPID)]
    if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
        kinds.insert(0, ("user", CLONE_NEWUSER))
    # Open them all first: once in the sandbox's mount namespace, /proc is its own (other PIDs).
    fds = [(kind, flag, os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY)) for kind, flag in kinds]
    for kind, flag, fd in fds:
        try:
            _check(_libc.setns(fd, flag), f"setns {kind}")
        finally:
            os.close(fd)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="the one writable directory (build a sandbox)")
    parser.add_argument("--join", type=int, help="run in the sandbox whose PID 1 has this host PID")
    parser.add_argument("--expose", action="append", default=[], help="a path the uid must reach")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    parser.add_argument("--cwd", help="working directory of the command")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or (args.data is None) == (args.join is None):
        parser.error("give --data or --join, then -- COMMAND")
    if args.join is not None:
        join(args.join)
    else:
        build(args)
    drop_privileges(args.uid, args.gid)
    if args.cwd:
        os.chdir(args.cwd)
    if args.join is not None:
        # A PID namespace applies to children only: run the command as one and pass on its status.
        child = os.fork()
        if child == 0:
            os.execvp(command[0], command)
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
