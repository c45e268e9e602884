"""One long-running exiftool process (``-stay_open True -@ -``) for a whole batch of files.

exiftool is the metadata engine Immich and PhotoPrism rely on: it merges into existing XMP,
EXIF and IPTC without dropping what it does not know. sat talks to it through its argument-file
protocol: one argument per line, ``-execute{N}`` ends a command, ``{readyN}`` ends its output
(on stderr through ``-echo4``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from ..errors import SatError

INSTALL_HINT = ("sat needs exiftool to read and write photo metadata: install it with "
                "`apt install libimage-exiftool-perl` (Debian/Ubuntu), `brew install exiftool` (macOS) "
                "or from exiftool.org, then run the command again.")


class ExifToolError(SatError):
    """exiftool is missing or stopped answering."""


class ExifTool:
    """``with ExifTool(config=TEXT) as et: et.execute(...)``; ``config`` is an exiftool config
    file's text (user-defined tags), loaded for the life of the process."""

    def __init__(self, config: str | None = None, executable: str | None = None):
        self.executable = executable or os.environ.get("SAT_EXIFTOOL") or shutil.which("exiftool")
        self.config = config
        self._proc = None
        self._config_path = None
        self._n = 0

    def __enter__(self) -> "ExifTool":
        if not self.executable:
            raise ExifToolError(INSTALL_HINT)
        cmd = [self.executable]
        if self.config:
            fd, self._config_path = tempfile.mkstemp(prefix="sat-exiftool-", suffix=".config")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.config)
            cmd += ["-config", self._config_path]  # must come first
        cmd += ["-stay_open", "True", "-@", "-"]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            self._cleanup()
            raise ExifToolError(f"Cannot start exiftool ({exc}). {INSTALL_HINT}") from exc
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.write(b"-stay_open\nFalse\n")
                proc.stdin.flush()
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        self._cleanup()

    def _cleanup(self):
        if self._config_path:
            try:
                os.unlink(self._config_path)
            except OSError:
                pass
            self._config_path = None

    def execute(self, *args) -> tuple[str, str]:
        """Run one exiftool command (arguments as str, or bytes for file names); returns
        (stdout, stderr) as text."""
        if self._proc is None:
            raise ExifToolError("exiftool is not running (use `with ExifTool() as et:`)")
        self._n += 1
        n = self._n
        lines = []
        for arg in (*args, "-echo4", f"{{ready{n}}}", f"-execute{n}"):
            raw = os.fsencode(arg)  # file names as their exact bytes, text as UTF-8
            if b"\n" in raw or b"\r" in raw or (raw.startswith(b"-") and b"=" in raw):
                # a tag value: exiftool's C-string argument form keeps line breaks and edge spaces
                raw = b"#[CSTR]" + raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
            lines.append(raw)
        try:
            self._proc.stdin.write(b"\n".join(lines) + b"\n")
            self._proc.stdin.flush()
            out = self._read_until(self._proc.stdout, f"{{ready{n}}}".encode())
            err = self._read_until(self._proc.stderr, f"{{ready{n}}}".encode())
        except (OSError, EOFError) as exc:
            raise ExifToolError(f"exiftool stopped answering ({exc})") from exc
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    @staticmethod
    def _read_until(pipe, sentinel: bytes) -> bytes:
        buf = b""
        fd = pipe.fileno()
        while True:
            end = buf.rfind(sentinel)
            if end != -1 and buf[end + len(sentinel):].strip() == b"":
                return buf[:end]
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("exiftool exited")
            buf += chunk

    def read(self, paths: list, tags: list[str]) -> dict:
        """The given tags of each file as {path: {"Group:Tag": value}} (-j -G1 -a). A file exiftool
        could not read, or whose name its JSON does not give back exactly, is left out."""
        if not paths:
            return {}
        out, _ = self.execute("-j", "-G1", "-a", "-charset", "iptc=UTF8", "-charset", "exif=UTF8",
                              *tags, *paths)
        rows = json.loads(out) if out.strip() else []
        found = {row.pop("SourceFile"): row for row in rows}
        return {p: found[p] for p in paths if p in found}
