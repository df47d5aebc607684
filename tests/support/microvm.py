"""A micro-VM that mounts the store over virtio-fs: QEMU, a Debian kernel, a busybox initramfs.

The guest is QEMU's q35 machine with 256 MiB of RAM shared with the backend
(a ``memfd``, which a vhost-user backend must be able to map), one
``vhost-user-fs-pci`` device with the tag ``tvix``, and no disk: the kernel
is the Debian cloud kernel (fetched once with ``apt-get download`` into
:func:`cache_dir`, never installed), and the initramfs holds the static
busybox (and Debian's getfattr with its libraries), the virtio and virtiofs
modules, and an ``/init`` that loads them,
mounts ``-t virtiofs tvix /nix/store -o ro`` (as upstream's tvix-init does),
runs the test's shell commands in ``/nix/store``, unmounts and powers off.
The guest's output comes back on the serial console, one ``@@`` line per
result.

KVM is used when it can boot a stock kernel; the nested "PVM" KVM of some
cloud VMs cannot (it hangs after the BIOS), so there QEMU emulates (TCG): a
boot then costs about 4 s of CPU, 4-25 s of wall time depending on the load.
"""

from __future__ import annotations

import gzip
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MODULES",
    "VmAssets",
    "VmResult",
    "assets",
    "cache_dir",
    "missing_tools",
    "run_vm",
]

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
GETFATTR = "getfattr"
KERNEL_META = "linux-image-cloud-amd64"
# Load order (dependencies first); whichever are modules in this kernel.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
)
TAG = "tvix"
MEMORY_MIB = 256


def cache_dir() -> Path:
    """Where the kernel is kept: ``$TVIX_MICROVM_CACHE``, else ``~/.cache/tvix-store-microvm``."""
    env = os.environ.get("TVIX_MICROVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tvix-store-microvm"


def missing_tools() -> list[str]:
    """What this machine lacks to boot the VM (Debian packages to install)."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append("qemu-system-x86")
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        missing.append("busybox-static")
    if shutil.which("cpio") is None:
        missing.append("cpio")
    if shutil.which(GETFATTR) is None:
        missing.append("attr")
    return missing


def _with_libraries(program: str) -> list[Path]:
    """``program`` and the shared libraries it loads (``ldd``), each by absolute path."""
    path = shutil.which(program)
    assert path is not None, program
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    found = [Path(path)]
    for line in out.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        # "/lib64/ld-linux-x86-64.so.2 (0x...)"
        target = line.split("=>")[-1].split("(")[0].strip()
        if target.startswith("/"):
            found.append(Path(target))
    return found


def _is_static(path: Path) -> bool:
    # A dynamic executable names its loader near the start (PT_INTERP); the
    # initramfs has no libraries, so only a static busybox runs there.
    with path.open("rb") as f:
        return b"/ld-linux" not in f.read(4096)


@dataclass(frozen=True)
class VmAssets:
    """A kernel and the modules the guest loads, in load order."""

    kernel: Path
    modules: tuple[Path, ...]


def assets(cache: Path | None = None) -> VmAssets:
    """The guest kernel and its virtio-fs modules, fetched into the cache on first use."""
    cache = cache if cache is not None else cache_dir()
    found = _cached(cache)
    if found is not None:
        return found
    package = _kernel_package()
    download = cache / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    subprocess.run(["apt-get", "download", package], cwd=download, check=True, capture_output=True)
    (deb,) = download.glob("*.deb")
    tree = cache / "kernel.tmp"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    data = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
    ).stdout
    subprocess.run(
        [
            "tar",
            "-x",
            "-C",
            str(tree),
            "--wildcards",
            "./boot/vmlinuz-*",
            "*/kernel/fs/fuse/*",
            "*/kernel/drivers/virtio/*",
        ],
        input=data,
        check=True,
        capture_output=True,
    )
    final = cache / "kernel"
    shutil.rmtree(final, ignore_errors=True)
    tree.rename(final)
    shutil.rmtree(download, ignore_errors=True)
    found = _cached(cache)
    assert found is not None, f"no kernel or modules in {package}"
    return found


def _cached(cache: Path) -> VmAssets | None:
    kernels = sorted((cache / "kernel" / "boot").glob("vmlinuz-*"))
    if not kernels:
        return None
    by_name = {}
    for ko in (cache / "kernel").rglob("*.ko*"):
        by_name[ko.name.split(".ko")[0].replace("-", "_")] = ko
    if "virtiofs" not in by_name:
        return None
    return VmAssets(kernels[-1], tuple(by_name[m] for m in MODULES if m in by_name))


def _kernel_package() -> str:
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "Depends:" and parts[1].startswith("linux-image-"):
            return parts[1]
    raise RuntimeError(f"apt-cache depends {KERNEL_META} names no kernel image")


_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" 2>/dev/null; done
echo "@@ start"
if mount -t virtiofs {tag} /nix/store -o ro; then
  echo "@@ mounted"
  cd /nix/store && sh /guest.sh 2>&1
  echo "@@ guest-rc $?"
  cd /
  umount /nix/store && echo "@@ umounted"
else
  echo "@@ mount-failed"
fi
echo "@@ done"
poweroff -f
"""


def build_initramfs(dest: Path, vm: VmAssets, guest_script: str) -> Path:
    """An initramfs whose init runs ``guest_script`` in the mounted store (gzip'd newc cpio)."""
    root = dest.with_suffix(".root")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "nix/store", "modules"):
        (root / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    # busybox has no getfattr: Debian's, with the libraries it loads at their paths.
    for path in _with_libraries(GETFATTR):
        inside = root / "bin" / path.name if path.name == GETFATTR else root / path.relative_to("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, inside)
    for i, ko in enumerate(vm.modules):
        data = ko.read_bytes()
        # Numbered so the shell's glob loads them in dependency order.
        (root / "modules" / f"{i:02d}-{ko.name.split('.ko')[0]}.ko").write_bytes(data)
    init = root / "init"
    init.write_text(_INIT.replace("{tag}", TAG))
    init.chmod(0o755)
    (root / "guest.sh").write_text(guest_script)
    names = sorted(
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    )
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input="\n".join(names).encode() + b"\n",
        check=True,
        capture_output=True,
    ).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=1))
    shutil.rmtree(root)
    return dest


@dataclass
class VmResult:
    """What the guest printed: ``@@`` lines (without the marker), the whole console, timing."""

    lines: list[str]
    console: str
    seconds: float
    accel: str
    times: list[float] = field(default_factory=list)  # host seconds since QEMU started, per line

    def time_of(self, line: str) -> float:
        """When the guest printed ``line`` (host seconds since QEMU started)."""
        return self.times[self.lines.index(line)]

    def values(self, key: str) -> list[str]:
        """The rest of every line that starts with ``key``."""
        prefix = key + " "
        return [line[len(prefix) :] for line in self.lines if line.startswith(prefix)]


def kvm_usable() -> bool:
    """Whether KVM can boot a stock kernel here (not the nested PVM variant)."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and not Path("/sys/module/kvm_pvm").exists()


def run_vm(
    socket_path: Path,
    vm: VmAssets,
    guest_script: str,
    workdir: Path,
    *,
    timeout: float = 120.0,
    queue_size: int = 1024,
    request_queues: int = 1,
) -> VmResult:
    """Boot a guest against the backend listening at ``socket_path``; what it printed."""
    initramfs = build_initramfs(workdir / "initramfs.gz", vm, guest_script)
    accels = ["kvm", "tcg"] if kvm_usable() else ["tcg"]
    for accel in accels:
        result = _boot(socket_path, vm, initramfs, accel, timeout, queue_size, request_queues)
        if result.lines or accel == accels[-1]:
            return result
    raise AssertionError("unreachable")


def _boot(
    socket_path: Path,
    vm: VmAssets,
    initramfs: Path,
    accel: str,
    timeout: float,
    queue_size: int,
    request_queues: int,
) -> VmResult:
    cpu = "host" if accel == "kvm" else "max"
    args = [
        QEMU,
        "-machine",
        "q35",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        f"{MEMORY_MIB}M",
        "-object",
        f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        f"socket,id=vfs0,path={socket_path}",
        "-device",
        f"vhost-user-fs-pci,chardev=vfs0,tag={TAG},queue-size={queue_size},"
        f"num-request-queues={request_queues}",
        "-kernel",
        str(vm.kernel),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    output = bytearray()
    lines: list[str] = []
    times: list[float] = []
    pending = b""
    deadline = start + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                output += f"\n(QEMU killed after {timeout} s)".encode()
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.monotonic() - start
            output += chunk
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").rstrip("\r")
                if line.startswith("@@ "):
                    # Timed on the host: the guest's clock drifts under emulation.
                    lines.append(line[3:])
                    times.append(now)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    seconds = time.monotonic() - start
    return VmResult(lines, output.decode(errors="replace"), seconds, accel, times)
