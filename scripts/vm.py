#!/usr/bin/env python3
"""Runs a command as root in a Linux virtual machine of its own (QEMU), for what this machine's
kernel cannot show: these machines' cgroup controllers are all on cgroup v1 hierarchies, and most
hosts now run cgroup v2 alone.

The guest is Debian's current kernel (`linux-image-amd64`'s, downloaded once with `apt-get
download` into `.cache/vm/`) with a busybox initramfs; it sees this machine's root filesystem
read-only over 9p (so the repository, its built binaries, bubblewrap and Python are the host's),
with tmpfs on /tmp, /run, /root and /dev/shm, only `cgroup2` mounted on /sys/fs/cgroup (every
controller on the unified hierarchy, as on a systemd host booted with cgroup v2), loopback up, and
the modules workspace quotas need loaded. `--out DIR` is shared read-write at the same path. The
command runs as root from `sh -c`; its exit status is this script's. With `--systemd` the host's
systemd is the guest's PID 1 instead, booting into the command's unit alone (the host's enabled
services do not start), which runs the command as a oneshot unit, its output on the console.
Under software emulation (these machines' nested /dev/kvm hangs a guest at boot): a boot takes
~10 s (systemd's ~15 s), a program runs a few times slower than on the host. Test support only: nothing here is shipped.

    scripts/vm.py [--out DIR] [--memory 3072] [--cpus 2] [--systemd] -- COMMAND...
"""

import argparse
import atexit
import gzip
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache/vm"
# What the initramfs needs to mount the host's root over 9p, and what it then loads from that
# root's copy of the kernel's modules (workspace quotas: ext4 images on loop devices).
NINEP = ["virtio_pci", "9pnet_virtio", "9p"]
PRELOAD = ["loop", "crc32c_generic", "ext4"]
BUSYBOX = "/bin/busybox"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /sbin && ln -s /bin/modprobe /sbin/modprobe
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev
for m in {ninep}; do modprobe $m || echo "vm: modprobe $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host
# The kernel's own modules (from the host's copy), loaded here: after switch_root there is no
# modprobe for the kernel to call.
mount --bind /host{modules} /lib/modules
for m in {preload}; do modprobe $m || echo "vm: modprobe $m failed"; done
H=/host
mount -t proc proc $H/proc; mount -t sysfs sys $H/sys && mount -t devtmpfs dev $H/dev
mkdir -p $H/dev/pts $H/dev/shm 2>/dev/null
mount -t devpts devpts $H/dev/pts && mount -t tmpfs shm $H/dev/shm
mount -t cgroup2 cgroup2 $H/sys/fs/cgroup
# What of the host's /root stays visible under the guest's tmpfs /root: where the repository's
# venv interpreter lives (pyenv's versions, say).
for d in {rootkeep}; do mkdir -p /keep/$d && mount --bind $H/root/$d /keep/$d; done
for d in tmp run root var/tmp; do mount -t tmpfs -o mode=1777 tmp $H/$d; done
chmod 700 $H/root
for d in {rootkeep}; do mkdir -p $H/root/$d && mount --move /keep/$d $H/root/$d; done
mkdir -p $H{out} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out $H{out}
mkdir -p $H/run/vm && cp /bin/busybox $H/run/vm/busybox
# The command, and what runs it either way: its status goes to the shared directory.
printf '%s\n' {command} > $H/run/vm/command.sh
printf '%s\n' 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1' \
  '/bin/sh /run/vm/command.sh; echo $? > "{out}/.vm-status"; sync' > $H/run/vm/run.sh
ip link set lo up
hostname vm
echo "vm: $(uname -r), cgroup controllers: $(cat $H/sys/fs/cgroup/cgroup.controllers)"
# switch_root, not chroot: a chrooted process may not make user namespaces (bubblewrap's).
if [ {systemd} = 1 ]; then
  # systemd as PID 1 (the host's), starting only the command's unit: it finds /run mounted and
  # keeps it, with the unit in it.
  mkdir -p $H/run/systemd/system
  printf '%s\n' '[Unit]' 'Description=vm.py command' 'After=basic.target' 'SuccessAction=poweroff-immediate' \
    'FailureAction=poweroff-immediate' '[Service]' 'Type=oneshot' 'StandardOutput=tty' 'StandardError=tty' \
    'TTYPath=/dev/ttyS0' 'ExecStart=/bin/sh /run/vm/run.sh' > $H/run/systemd/system/vm-command.service
  exec switch_root $H /lib/systemd/systemd --unit=vm-command.service --log-level=warning --show-status=false
fi
exec switch_root $H /usr/bin/env -i /bin/sh -c '/bin/sh /run/vm/run.sh; exec /run/vm/busybox poweroff -f'
"""


def log(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


def current_kernel() -> str:
    """The release of Debian's current kernel package (`linux-image-amd64` depends on it), or of
    the one cached before when apt cannot say."""
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends: ")
        if name.startswith("linux-image-") and name != line.strip():
            return name.removeprefix("linux-image-")
    cached = sorted(p.name for p in CACHE.glob("*") if (p / "root/boot").is_dir())
    if not cached:
        sys.exit("vm: apt knows no linux-image-amd64 and none is cached")
    return cached[-1]


def kernel(release: str) -> Path:
    """The guest kernel `release`, extracted from Debian's package once, its module index made."""
    root = CACHE / release / "root"
    if (root / "lib/modules" / release / "modules.dep").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        download = ["apt-get", "download", f"linux-image-{release}"]
        if subprocess.run(download, cwd=tmp, stdout=subprocess.DEVNULL).returncode != 0:
            # The package lists may name a release the mirror has replaced since.
            subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(download, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        deb = next(Path(tmp).glob("*.deb"))
        part = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(part)], check=True)
        subprocess.run([BUSYBOX, "depmod", "-b", str(part), release], check=True)
        shutil.rmtree(root, ignore_errors=True)
        part.rename(root)
    return root


def root_kept() -> list[str]:
    """The directory of the host's /root (its first component) holding the interpreter of the
    repository's venv, if there: the guest's /root is a tmpfs, which would hide it."""
    python = (REPO / ".venv/bin/python").resolve()
    if python.is_relative_to("/root") and python != Path("/root"):
        return [python.relative_to("/root").parts[0]]
    return []


def initramfs(root: Path, release: str, out: Path, command: str, dest: Path, systemd: bool) -> None:
    """busybox, the modules 9p needs (with their dependencies) and the init script."""
    modules = root / "lib/modules" / release
    deps = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[Path(name).stem] = (name, rest.split())
    by_path = {path: stem for stem, (path, _) in deps.items()}
    want: set[str] = set()
    for m in NINEP:
        path, needs = deps[m]
        want |= {path, *needs}
    with tempfile.TemporaryDirectory() as tmp:
        ir = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "host"):
            (ir / d).mkdir()
        shutil.copy(BUSYBOX, ir / "bin/busybox")
        lib = ir / "lib/modules" / release
        for path in want:
            (lib / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(modules / path, lib / path)
        (lib / "modules.dep").write_text("".join(
            f"{deps[by_path[p]][0]}: {' '.join(deps[by_path[p]][1])}\n" for p in sorted(want)))
        init = ir / "init"
        init.write_text(INIT.format(ninep=" ".join(NINEP), preload=" ".join(PRELOAD), out=out, modules=root / "lib/modules",
                                    command=shlex.quote(command), systemd=int(systemd), rootkeep=" ".join(root_kept())))
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=ir, check=True, capture_output=True).stdout
        archive = subprocess.run([BUSYBOX, "cpio", "-o", "-H", "newc"], cwd=ir, input=files, check=True,
                                 capture_output=True).stdout
        dest.write_bytes(gzip.compress(archive, compresslevel=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="a directory shared read-write (default: a new one)")
    ap.add_argument("--memory", type=int, default=3072, help="MiB")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--systemd", action="store_true", help="boot the host's systemd, which runs the command as a unit")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command")
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("vm: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")
    if not Path(BUSYBOX).exists() or subprocess.run(["ldd", BUSYBOX], capture_output=True).returncode == 0:
        sys.exit(f"vm: {BUSYBOX} is missing or not static: it is the guest's init (apt-get install busybox-static)")
    release = current_kernel()
    root = kernel(release)
    out = Path(args.out or tempfile.mkdtemp(prefix="agentcube-vm-")).resolve()
    if args.out is None:
        atexit.register(shutil.rmtree, out, True)
    out.mkdir(parents=True, exist_ok=True)
    status = out / ".vm-status"
    status.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initramfs(root, release, out, " ".join(shlex.quote(c) for c in command), initrd, args.systemd)
        # Software emulation: these machines' /dev/kvm (nested under their own hypervisor) hangs a
        # guest at boot.
        qemu = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-m", str(args.memory), "-smp", str(args.cpus),
                "-nographic", "-vga", "none", "-no-reboot", "-net", "none", "-kernel", str(root / "boot" / f"vmlinuz-{release}"),
                "-initrd", str(initrd), "-append", "console=ttyS0 quiet loglevel=3 panic=-1 edd=off",
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
                "-virtfs", f"local,path={out},mount_tag=out,security_model=passthrough"]
        t = time.time()
        log(f"booting Linux {release} (cgroup v2 only) for: {' '.join(command)}")
        try:
            subprocess.run(qemu, stdin=subprocess.DEVNULL, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            sys.exit(f"vm: no end within {args.timeout:.0f} s")
    if not status.exists():
        sys.exit("vm: the guest ended without the command's status")
    rc = int(status.read_text().strip() or "1")
    log(f"exit status {rc} after {time.time() - t:.0f} s")
    sys.exit(rc)


if __name__ == "__main__":
    main()
