"""The `python` tool's sandbox: run a model's program in a throwaway directory, with no network,
a read-only filesystem and limits on time, memory and output.

`run_python` starts this very file as a script (`python -I -S sandbox.py ...`: stdlib only, not
the project nor torch). That bootstrap enters new namespaces through libc, no setuid helper:
- user: unprivileged root inside, which is what allows the others;
- network: only its own loopback, so neither the internet nor the host's localhost;
- mount: every mount read-only, nosuid and nodev but the working directory (a small tmpfs), and
  a /dev with only null, zero, full, random, urandom (host root could write to consoles...);
- PID: the program can neither see nor signal the trainer (same uid: it could kill it), and when
  the namespace's init exits, the kernel kills whatever the program left behind.
The program then runs in a fresh `python -E -s` with no capability left (with them it could
remount / read-write again), under no_new_privs and a seccomp filter that refuses sockets other
than IP ones (a Unix socket path, a docker or ray socket, crosses network namespaces) and
io_uring (which could open sockets around the filter).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SETUP_FAILED = 125  # the bootstrap's exit status when it could not build the sandbox
FILE_SIZE_LIMIT = 8 << 20  # RLIMIT_FSIZE: the largest file the program may write
_SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}


@dataclass(frozen=True)
class SandboxLimits:
    cpu_time_s: float = 5.0
    """RLIMIT_CPU of the program, in whole seconds (SIGXCPU at this, SIGKILL a second later)."""
    wall_time_s: float = 10.0
    """The whole sandbox is killed this long after its start."""
    memory_mb: int = 512
    """RLIMIT_AS of the program: its address space, so allocations fail with MemoryError."""
    max_output_bytes: int = 4096
    """stdout and stderr together; the program is stopped when it prints more."""
    disk_mb: int = 64
    """Size of the working directory, a tmpfs (so in memory, gone with the sandbox)."""


@dataclass(frozen=True)
class SandboxResult:
    stdout: str  # stdout and stderr interleaved, at most max_output_bytes
    returncode: int  # -N: killed by signal N (like a shell, exit statuses 129-192 read as signals)
    timed_out: bool  # killed at the wall-time limit
    killed_reason: str | None  # "wall time", "cpu time", "memory", "output limit", "signal X"
    truncated: bool


class SandboxError(RuntimeError):
    """The sandbox could not be built; the program did not run (never unsandboxed)."""


def run_python(code: str, limits: SandboxLimits) -> SandboxResult:
    """Run `code` as main.py in a fresh temporary directory, deleted afterwards."""
    workdir = tempfile.mkdtemp(prefix="tandem-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        return _run(workdir, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.cache
def sandbox_available() -> str | None:
    """None when a probe program runs in the sandbox, else why not (one line)."""
    machine = os.uname().machine
    if sys.platform != "linux" or machine not in _SECCOMP_ARCH:
        return f"needs Linux on x86_64 or aarch64, this is {sys.platform} on {machine}"
    try:
        result = run_python("print('ok')", SandboxLimits(wall_time_s=30, max_output_bytes=1024))
    except (SandboxError, OSError) as e:
        return str(e).strip().splitlines()[0]
    if result.stdout != "ok\n":
        return f"the probe printed {result.stdout[:200]!r} (exit status {result.returncode})"
    return None


def _run(workdir: str, limits: SandboxLimits) -> SandboxResult:
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), workdir]
    argv += [str(max(1, round(limits.cpu_time_s))), str(limits.memory_mb), str(limits.disk_mb)]
    path = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"
    env = {"PATH": path, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    # one BLAS thread: its CPU time counts against the limit, and a thread per core of a big
    # node would reserve more address space than memory_mb allows
    env |= {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    deadline = time.monotonic() + limits.wall_time_s
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, start_new_session=True,
    )  # fmt: skip
    chunks, size, killed = [], 0, None
    try:
        with proc.stdout, selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while size <= limits.max_output_bytes and selector.select(deadline - time.monotonic()):
                data = os.read(proc.stdout.fileno(), 1 << 16)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
        if size > limits.max_output_bytes:
            killed = "output limit"
        else:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        killed = "wall time"
    finally:
        if proc.returncode is None:  # the whole session: bootstrap, init, the program
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raw = b"".join(chunks)
    stdout = raw[: limits.max_output_bytes].decode("utf-8", "replace")
    returncode = 128 - proc.returncode if 128 < proc.returncode <= 192 else proc.returncode
    if returncode == SETUP_FAILED and stdout.startswith("sandbox setup failed"):
        raise SandboxError(stdout.strip())
    if killed is None and returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        killed = "cpu time"  # SIGXCPU at the soft limit, SIGKILL at the hard one
    elif killed is None and returncode != 0 and "MemoryError" in stdout[-2000:]:
        killed = "memory"
    elif killed is None and returncode < 0:
        killed = f"signal {_SIGNAL_NAMES.get(-returncode, -returncode)}"
    truncated = size > limits.max_output_bytes
    return SandboxResult(stdout, returncode, killed == "wall time", killed, truncated)


# ---- inside the sandbox: this file run as a script -------------------------------------------
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 0x4000, 0x40000
KEPT_FLAGS = {"noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 24, 22, 38
DEVICES = ("null", "zero", "full", "random", "urandom")
# audit arch, socket(2) number; io_uring_setup is 425 on both
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


def _check(result: int, what: str) -> None:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags: int, data=None) -> None:
    args = [os.fsencode(a) if a is not None else None for a in (source, target, fstype, data)]
    _check(_libc.mount(args[0], args[1], args[2], flags, args[3]), f"mount {target}")


def _prctl(option: int, *args: int) -> None:
    _check(_libc.prctl(option, *args, *[0] * (4 - len(args))), f"prctl {option}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces() -> None:
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host


def _make_dev() -> None:
    """A tmpfs /dev with bind mounts of the harmless devices only."""
    fds = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES}
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name, fd in fds.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")


def _remount_read_only(workdir: str) -> None:
    """Every mount read-only, nosuid, nodev, except the working directory (writable) and the
    device binds. A path that cannot be reached (covered by another mount, or not searchable)
    is as unreachable for the program; a mount already read-only may refuse the extra flags."""
    done = {f"/dev/{name}" for name in DEVICES}
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    for point, options in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        if point in done:
            continue
        done.add(point)
        options = options.split(",")
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
        flags |= sum(KEPT_FLAGS.get(o, 0) for o in options) | (point != workdir and MS_RDONLY)
        try:
            _mount(None, point, None, flags)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES) and "ro" not in options:
                raise


def _drop_privileges() -> None:
    """No capability left (so no mount can be undone), no way to gain one, and only IP sockets
    (seccomp: everything else, Unix sockets first, fails with EACCES)."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability
        _check(-1, f"drop capability {cap}")
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    _check(_libc.capset(header, data), "capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    arch, socket_nr = _SECCOMP_ARCH[os.uname().machine]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE, BPF_RET|K
    deny, allow = 0x50000 | errno.EACCES, 0x7FFF0000  # SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW
    program = [
        (load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, 0x80000000),  # other ABI: kill
        (load, 0, 0, 0), (jge, 5, 0, 0x40000000), (jeq, 4, 0, 425),  # x32 ABI, io_uring: deny
        (jeq, 0, 4, socket_nr), (load, 0, 0, 16),  # socket(): load its family
        (jeq, 2, 0, 2), (jeq, 1, 0, 10), (ret, 0, 0, deny), (ret, 0, 0, allow),  # AF_INET(6)
    ]  # fmt: skip
    filters = (ctypes.c_uint64 * len(program))(
        *(code | jt << 16 | jf << 24 | k << 32 for code, jt, jf, k in program)
    )
    fprog = (ctypes.c_uint64 * 2)(len(program), ctypes.addressof(filters))
    _prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog))  # SECCOMP_MODE_FILTER


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _init(cpu_s: int, memory_mb: int) -> int:
    """PID 1 of the new namespace: mount its /proc, drop privileges, run the program, wait."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the bootstrap killed: the namespace dies too
    _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _drop_privileges()
    pid = os.fork()
    if pid == 0:
        _guard(_run_program, cpu_s, memory_mb)
    return _exit_status(os.waitpid(pid, 0)[1])


def _run_program(cpu_s: int, memory_mb: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    os.execv(sys.executable, [sys.executable, "-E", "-s", "-u", "main.py"])


def _guard(fn, *args) -> None:
    """Run a setup step of the sandbox; any failure ends this process with SETUP_FAILED."""
    try:
        os._exit(fn(*args) or 0)
    except BaseException as e:  # reported to the parent; the program never runs unsandboxed
        os.write(2, f"sandbox setup failed: {e}\n".encode())
        os._exit(SETUP_FAILED)


def _bootstrap(workdir: str, cpu_s: int, memory_mb: int, disk_mb: int) -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _enter_namespaces()
    workdir = os.path.realpath(workdir)
    with open(os.path.join(workdir, "main.py"), "rb") as f:
        code = f.read()
    # its own mount, to stay writable: a tmpfs bounds the disk the program fills
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=700")
    with open(os.path.join(workdir, "main.py"), "wb") as f:
        f.write(code)
    _make_dev()
    _remount_read_only(workdir)
    os.chdir(workdir)  # after the mount: the old cwd would be the directory below it
    pid = os.fork()  # the first child is PID 1 of the new PID namespace
    if pid == 0:
        _guard(_init, cpu_s, memory_mb)
    return _exit_status(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    _libc = ctypes.CDLL(None, use_errno=True)  # here, so that importing works off Linux
    _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    _libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    _guard(_bootstrap, sys.argv[1], *map(int, sys.argv[2:]))
