"""Process-wide settings: applied by the commands that want them, checked in child processes so
the test process keeps its own."""

import subprocess
import sys

import pytest


def run_python(code: str, **env) -> str:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "SAT_SYSTEM_MALLOC"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_keep_freed_memory_applies_on_linux_with_glibc():
    import platform

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert run_python("from sat_cli.runtime import keep_freed_memory; print(keep_freed_memory())") == str(expected)


def test_system_malloc_can_be_kept():
    code = "from sat_cli.runtime import keep_freed_memory; print(keep_freed_memory())"
    assert run_python(code, SAT_SYSTEM_MALLOC="1") == "False"


def test_importing_sat_or_listing_encoders_loads_no_torch():
    code = ("import sys, sat_cli, sat_cli.cli.main; from sat_cli.model.encoders import families, offline_weights; "
            "families(); offline_weights(); print('torch' in sys.modules, 'timm' in sys.modules)")
    assert run_python(code) == "False False"


def test_plugin_hooks_run_once_per_set_of_plugins():
    from sat_cli.model.encoders import families
    from sat_cli.model.hookspecs import hookimpl
    from sat_cli.model.plugins import pm

    assert families() is families()
    calls = []

    class Counting:
        @hookimpl
        def register_encoders(register):
            calls.append(1)

    pm.register(Counting, name="counting")
    try:
        families()
        families()
        assert calls == [1]  # a new plugin: computed again, once
    finally:
        pm.unregister(name="counting")
    assert calls == [1]


def test_fp32_on_cuda_turns_tf32_off_only_inside_the_scope():
    import torch

    from sat_cli.runtime import precision_scope

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with precision_scope(torch.device("cuda"), "fp32"):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with precision_scope(torch.device("cpu"), "fp32"), precision_scope(torch.device("cuda"), "fp16"):
            assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("interrupt", [True, False])
def test_stop_signal(interrupt):
    import os
    import signal

    from sat_cli.runtime import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    with StopSignal(interrupt=interrupt) as stop:
        if interrupt:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):  # a second one aborts
                os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc: Linux")
def test_name_thread_sets_the_os_name_that_top_and_the_serve_bench_read():
    import threading

    from sat_cli.runtime import name_thread

    seen = {}

    def body():
        name_thread("sat-model-and-more-than-15")  # the kernel keeps 15 bytes
        seen["comm"] = open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["comm"] == "sat-model-and-m"
