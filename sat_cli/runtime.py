"""Where and how the work runs: device, precision, worker processes, torchrun's environment, the
glibc heap setting and stop signals. Process-wide settings are applied only by the commands that
want them (``sat caption``, ``sat eval``, ``sat train``), never on import."""

from __future__ import annotations

import contextlib
import os
import signal

from .errors import SatError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(name: str = "auto", local_rank: int | None = None):
    """--device auto|cpu|cuda|mps -> torch.device (auto: CUDA, then MPS, then the CPU). Under
    torchrun (``local_rank``), a CUDA device is the rank's own GPU."""
    import torch

    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SatError("--device cuda: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SatError("--device mps: Apple's Metal backend is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SatError(f"Unknown device {name!r}: use one of {', '.join(DEVICES)}") from exc
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_precision(device, precision: str = "auto", training: bool = False) -> str:
    """auto on CUDA: fp16 for inference (closest to fp32: 10 mantissa bits; the CNN encoders'
    activations fit its range), bf16 for training where supported (no loss scaling needed);
    fp32 elsewhere. Pure: see :func:`precision_scope` for the matching TF32 setting."""
    import torch

    if precision not in PRECISIONS:
        raise SatError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if training and torch.cuda.is_bf16_supported() else "fp16"


@contextlib.contextmanager
def precision_scope(device, precision: str):
    """While inside: on CUDA, fp32 really means fp32 (TF32 matrix products off, as the CPU computes);
    the previous TF32 settings come back on exit. Elsewhere it changes nothing."""
    import torch

    if device.type != "cuda" or precision != "fp32":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device, precision: str):
    """Context for the encoder's forward pass (beam search always runs in fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers() -> int:
    """Image-decoding worker processes: one per spare core, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of returning them to the kernel.

    glibc serves blocks above its mmap threshold (at most 32 MB) with mmap and unmaps them on
    free, so a tensor allocated and freed at every decoding step or encoder layer is page-faulted
    in anew each time: with the defaults a third of CPU beam-search time, and half of a 384-px
    Lite0 forward at batch 16, went to the kernel (measured on a 2-core Xeon). With mmap off and
    a 1 GB trim threshold, freed blocks stay in the heap and are reused. Linux with glibc only;
    True when applied. It lasts for the life of the process (the commands that call it end
    with it); SAT_SYSTEM_MALLOC=1 in the environment leaves malloc as it is.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("SAT_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


class Dist:
    """torchrun's environment (rank, world size, local rank) and the collectives sat uses; every
    method is a no-op on a single process."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.rank = int(env.get("RANK", 0))
        self.world = int(env.get("WORLD_SIZE", 1))
        self.local_rank = int(env.get("LOCAL_RANK", 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device):
        if self.world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def init_objects(self, timeout_s: float = 3600.0):
        """A gloo process group for sending Python objects (captioning results to the one writer).
        ``timeout_s``: how long a collective waits for a rank before it fails."""
        if self.world > 1:
            import datetime

            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def gather_to_main(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world if self.main else None
        td.gather_object(obj, out, dst=0)
        return out

    def barrier(self):
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, device) -> bool:
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as td

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        td.all_reduce(t)
        return bool(t.item() > 0)

    def average_gradients(self, params):
        """Mean of the gradients over the ranks, for parameters stepped outside DDP's forward."""
        if self.world == 1:
            return
        import torch.distributed as td

        for p in params:
            if p.grad is not None:
                td.all_reduce(p.grad)
                p.grad /= self.world

    def close(self):
        if self.world > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.barrier()  # every rank done with its last collective before any tears the group down
                td.destroy_process_group()


def quiet_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a worker leaves Ctrl-C to the main process (which stops
    cleanly and ends its workers), and once the main process is gone nothing a worker's threads
    raise is printed (torch's fd-passing thread in multiprocessing/resource_sharer.py used to print
    a cut-off traceback when the main process ended mid-transfer)."""
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    previous = threading.excepthook

    def hook(args):
        if os.getppid() != parent or issubclass(args.exc_type, (ConnectionError, EOFError, OSError)):
            return  # the main process is gone or going: nobody to tell
        previous(args)

    threading.excepthook = hook


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) as its OS name (Linux; elsewhere
    nothing), so per-thread CPU (/proc/PID/task/*/comm, top -H) tells sat's threads apart; threads
    it starts later (torch's OpenMP workers) inherit it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class StopSignal:
    """Ctrl-C and SIGTERM (a scheduler's stop) while inside.

    ``interrupt=True``: both raise KeyboardInterrupt at once, so a loop ends after its last
    committed batch. Otherwise the first one sets ``requested`` (the loop stops cleanly at its
    next check) and a second one raises KeyboardInterrupt. Off the main thread it installs nothing.
    """

    def __init__(self, interrupt: bool = False):
        self.interrupt = interrupt
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.interrupt or self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGTERM,) if self.interrupt else (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
