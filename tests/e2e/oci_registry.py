"""A real OCI registry (Debian's `docker-registry`) on loopback, and images built here from host
files and pushed with the registry v2 API (blob uploads, then the manifest)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import requests

SKIP_DIRS = {"test", "__pycache__", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data"}


class Registry:
    def __init__(self, tmp: Path, port: int):
        self.addr = f"127.0.0.1:{port}"
        config = tmp / "registry.yml"
        config.write_text(
            "version: 0.1\nlog: {level: warn}\n"
            f"storage:\n  filesystem: {{rootdirectory: {tmp / 'registry'}}}\n"
            f"http: {{addr: \"{self.addr}\"}}\n"
        )
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                if requests.get(f"http://{self.addr}/v2/", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def _blob(self, name: str, data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = requests.post(f"http://{self.addr}/v2/{name}/blobs/uploads/", timeout=30)
        start.raise_for_status()
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.addr}{location}"
        sep = "&" if "?" in location else "?"
        put = requests.put(f"{location}{sep}digest={digest}", data=data, timeout=60,
                           headers={"Content-Type": "application/octet-stream"})
        put.raise_for_status()
        return {"digest": digest, "size": len(data)}

    def push(self, name: str, tag: str, layers: list[bytes], config: dict) -> str:
        """Pushes gzip `layers` with the image config's `config` object; returns the manifest digest."""
        diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(l)).hexdigest() for l in layers]
        image_config = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                                   "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **self._blob(name, image_config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **self._blob(name, l)}
                       for l in layers],
        }
        body = json.dumps(manifest).encode()
        r = requests.put(f"http://{self.addr}/v2/{name}/manifests/{tag}", data=body, timeout=30,
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        r.raise_for_status()
        return "sha256:" + hashlib.sha256(body).hexdigest()


class Layer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(path)
        info.size, info.mode = len(data), mode
        self.tar.addfile(info, io.BytesIO(data))

    def dir(self, path: str) -> None:
        info = tarfile.TarInfo(path)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        self.tar.addfile(info)

    def symlink(self, path: str, target: str) -> None:
        info = tarfile.TarInfo(path)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self.tar.addfile(info)

    def tree(self, host: Path, inside: str) -> None:
        self.dir(inside)
        for entry in sorted(host.iterdir()):
            target = f"{inside}/{entry.name}"
            if entry.is_symlink():
                self.symlink(target, os.readlink(entry))
            elif entry.is_dir():
                if entry.name not in SKIP_DIRS:
                    self.tree(entry, target)
            elif entry.is_file():
                self.file(target, entry.read_bytes(), entry.stat().st_mode & 0o777)

    def gz(self) -> bytes:
        self.tar.close()
        return gzip.compress(self.buf.getvalue(), compresslevel=1)


def _libraries(binaries: list[Path]) -> set[str]:
    libs: set[str] = set()
    for b in binaries:
        out = subprocess.run(["ldd", str(b)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            right = line.split("=>", 1)[-1].split()
            if right and right[0].startswith("/"):
                libs.add(right[0])
    return libs


def python_base_layer() -> bytes:
    """Merged /usr with this host's dash (as sh) and Python (interpreter, stdlib without tests,
    the libraries they link), and an /etc/passwd. Nothing else of the host."""
    python = Path("/usr/bin/python3").resolve()
    stdlib = Path("/usr/lib") / python.name
    binaries = [python, Path("/usr/bin/dash"), *sorted((stdlib / "lib-dynload").glob("*.so"))]
    l = Layer()
    for d in ["usr", "usr/bin", "usr/lib", "usr/lib64", "usr/lib/x86_64-linux-gnu", "etc"]:
        l.dir(d)
    for link, target in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/bin")]:
        l.symlink(link, target)
    l.file(f"usr/bin/{python.name}", python.read_bytes(), 0o755)
    l.symlink("usr/bin/python3", python.name)
    l.file("usr/bin/dash", Path("/usr/bin/dash").read_bytes(), 0o755)
    l.symlink("usr/bin/sh", "dash")
    for lib in sorted(_libraries(binaries)):
        inside = lib.lstrip("/").removeprefix("usr/")
        l.file(f"usr/{inside}", Path(lib).read_bytes(), 0o755)
    l.tree(stdlib, f"usr/lib/{python.name}")
    l.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
    return l.gz()
