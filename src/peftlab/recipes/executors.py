"""Where a study's runs go: a local pool of worker processes, or a Ray cluster.

A study, a cross-validation or a sweep hands its runs to an executor as `RunTask`s and gets `RunResult`s back, in
the order given, whatever order they finished in. Each run gets a fresh process (its memory goes back to the
system when it ends, and a crash or an out-of-memory kill costs that run only).

- `local` (the default, 1 worker): worker processes on this machine. With N workers, `train.threads` left unset
  becomes cores / N per run. The workers' output goes to `<run>/worker.log` when there is more than one, so that
  two progress bars do not interleave; the study prints one line as each run starts and ends.
- `ray`: each run is a Ray task that asks for its CPUs (and a GPU where the run uses one). A node trains in its own
  scratch folder (`PEFTLAB_SCRATCH`, default the system temp folder), and the finished run folder comes back to the
  driver's output_dir through Ray's object store: no shared filesystem is needed. A started run's folder (its
  checkpoint) travels with the task, so it resumes on whichever node takes it. A worker killed mid-run is retried
  once by Ray, from the checkpoint it left on that node if the retry lands there, else from the start.

SIGTERM or Ctrl-C to the driver stops every run in flight (each checkpoints its current step) and the study exits
with one line; a rerun resumes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal

from pydantic import StrictInt, StrictStr, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as section

from peftlab.core.allocator import reuse_freed_memory
from peftlab.core.errors import NotSupported
from peftlab.core.result import RunResult
from peftlab.core.schema import FORBID, checked, setting
from peftlab.recipes.runner import RunTask, default_threads, ended, run_task

STOP_GRACE_S = 60  # how long a stopped run may take to checkpoint its current step before it is killed

# (event, task, result): "start" as a run begins (result None), "end" as it ends
Events = Callable[[str, RunTask, RunResult | None], None]


@section(frozen=True, config=FORBID)
class ExecutorSpec:
    """A study's `executor:` section, or `--executor`/`--workers` on the command line."""

    kind: Literal["local", "ray"] = setting("local", "local: worker processes on this machine; ray: a Ray cluster")
    workers: StrictInt = setting(1, "runs at once", ge=1)
    address: StrictStr | None = setting(None, "ray: auto, or ray://host:port; default: a local Ray on this machine")

    @field_validator("address")
    @classmethod
    def _for_ray(cls, address: str | None, info: ValidationInfo) -> str | None:
        if address is not None and info.data.get("kind") != "ray":
            raise ValueError("is for kind ray")
        return address


def parse_executor(raw: Any, kind: str | None = None, workers: int | None = None) -> ExecutorSpec:
    """The study's `executor:` mapping, with the command line's `--executor` and `--workers` on top."""
    raw = {} if raw is None else raw
    flags = {key: value for key, value in (("kind", kind), ("workers", workers)) if value is not None}
    return checked(ExecutorSpec, {**raw, **flags} if isinstance(raw, dict) else raw, "executor", "study",
                   "such as {kind: local, workers: 2}")


def open_pool(spec: ExecutorSpec, events: Events | None = None) -> Pool:
    """The pool `spec` names, ready to take tasks (`with open_pool(spec) as pool:` stops what is in flight on a
    signal or an error)."""
    if spec.kind == "ray":
        return RayPool(spec.workers, spec.address, events)
    return LocalPool(spec.workers, events)


def run_all(spec: ExecutorSpec, tasks: list[RunTask], events: Events | None = None) -> list[RunResult]:
    """Run every task on the executor `spec` names; the results in the order of `tasks`."""
    results: dict[str, RunResult] = {}
    with open_pool(spec, events) as pool:
        for task in tasks:
            if not pool.has_room:
                done, result = pool.next_result()
                results[done.name] = result
            pool.submit(task)
        while pool.busy:
            done, result = pool.next_result()
            results[done.name] = result
    return [results[t.name] for t in tasks]


class Pool:
    """At most `workers` runs in flight. `submit` starts one, `next_result` waits for whichever ends first. Leaving
    the `with` block on an exception (a stop signal, a bug) stops every run in flight, and each says where it
    stopped. Subclasses say how a run starts, is waited for, is collected and is stopped."""

    def __init__(self, workers: int, events: Events | None = None) -> None:
        self.workers, self.events = workers, events or (lambda event, task, result: None)
        self.running: dict = {}  # handle -> task

    @property
    def has_room(self) -> bool:
        return len(self.running) < self.workers

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, task: RunTask) -> None:
        """Start `task` (there must be room); with `train.threads` unset it gets its share of the cores."""
        if task.threads is None:
            task = replace(task, threads=self.threads_per_run)
        self.running[self._start(task)] = task
        self.events("start", task, None)

    def next_result(self) -> tuple[RunTask, RunResult]:
        """Wait for the next run to end: its task and result."""
        handle = self._wait()
        task = self.running.pop(handle)
        result = self._collect(task, handle)
        self.events("end", task, result)
        return task, result

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None and self.running:  # SIGTERM/SIGINT (core.signals.Stopped) or a bug: no run outlives it
            self._stop(list(self.running))
            for handle, task in list(self.running.items()):
                self.events("end", task, self._collect(task, handle))
            self.running.clear()

    threads_per_run: int | None = None  # train.threads for a run that leaves it unset; None: the run's own default

    def _start(self, task: RunTask): ...
    def _wait(self): ...
    def _collect(self, task: RunTask, handle) -> RunResult: ...
    def _stop(self, handles: list) -> None: ...


# ---------------------------------------------------------------------------------------------------------------------
# Local: worker processes on this machine
# ---------------------------------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the driver dies (kill -9, a lost terminal). An orphan would
    keep training a run nobody waits for and hold its folder's lock against the rerun; killed, it leaves its last
    periodic checkpoint, which the rerun resumes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the driver died before the line above
        os._exit(1)


def worker_main(result_fd: int) -> None:
    """A worker process (`python -m peftlab.recipes.executors FD`): read one pickled task on stdin, run it, and
    write its pickled result to file descriptor FD. A bug is a failed result, its traceback in the run's output."""
    die_with_parent()
    task = pickle.load(sys.stdin.buffer)
    reuse_freed_memory()  # as the CLI does for a run (core.allocator)
    try:
        result = run_task(task)
    except BaseException as err:
        traceback.print_exc()
        result = ended(task, "failed", f"{type(err).__name__}: {err}".splitlines()[0])
    with os.fdopen(result_fd, "wb") as out:
        pickle.dump(result, out)


class LocalPool(Pool):
    """Each run in a fresh Python process (no state inherited from the driver: torch's thread pool and allocator
    start clean). The workers stay in the driver's process group, so a terminal's Ctrl-C reaches them at once and
    a kill of the group leaves no orphan holding a run's lock."""

    @property
    def threads_per_run(self) -> int:
        return default_threads(self.workers)

    def _start(self, task: RunTask) -> tuple:
        read_end, write_end = os.pipe()
        log = None
        if self.workers > 1:  # several workers: each run's output to its own log, not interleaved on the terminal
            task.run_dir.mkdir(parents=True, exist_ok=True)
            log = open(task.run_dir / "worker.log", "ab")  # closed below, once the child holds its own copy
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "peftlab.recipes.executors", str(write_end)], pass_fds=(write_end,),
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT if log else None,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            os.close(write_end)  # the child holds the only write end: its exit ends the pipe
            if log is not None:
                log.close()
        proc.stdin.write(pickle.dumps(task))
        proc.stdin.close()
        return proc, os.fdopen(read_end, "rb")

    def _wait(self) -> tuple:
        ready = wait([pipe for _, pipe in self.running])  # a result written, or a worker gone without one
        return next(handle for handle in self.running if handle[1] in ready)

    @staticmethod
    def _collect(task: RunTask, handle: tuple) -> RunResult:
        proc, pipe = handle
        data = pipe.read()
        pipe.close()
        proc.wait()
        if not data:  # the process died without a word: killed (out of memory) or crashed in C
            return ended(task, "failed", f"its worker process ended with exit code {proc.returncode} and no result")
        return pickle.loads(data)  # written by our own worker process above

    def _stop(self, handles: list) -> None:
        stop_processes([proc for proc, _ in handles])


def stop_processes(procs: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process, then wait: a run checkpoints its current step and exits (train.loop). SIGKILL after
    `grace` seconds, or at once on another signal; the run's last periodic checkpoint then stays for the rerun."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    try:
        for proc in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
    except BaseException:  # past the grace period, or a second signal: kill at once below
        pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Ray: each run a task on a cluster; run folders come back through the object store
# ---------------------------------------------------------------------------------------------------------------------


def pack(folder: Path) -> bytes:
    """A run folder as a gzipped tar (its lock file left out)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != ".lock":
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


def unpack(data: bytes, folder: Path) -> None:
    """Lay a packed run folder out at `folder`, over what is there (a started run's older checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")


def scratch_root() -> Path:
    """Where a Ray node trains: `PEFTLAB_SCRATCH`, else the system temp folder; never the driver's output_dir."""
    return Path(os.environ.get("PEFTLAB_SCRATCH") or tempfile.gettempdir()) / "peftlab-scratch"


def ray_task(task: RunTask, started: bytes | None) -> tuple[RunResult, bytes]:
    """The body of a Ray task: run in this node's scratch folder, then send the run folder back packed.

    The scratch folder is named after the study's output folder and the run, so a retry on the same node finds
    the checkpoint the killed attempt left; `started` (the driver's copy of a started run) seeds it otherwise.
    """
    reuse_freed_memory()
    study = task.config["output_dir"].strip("/").replace("/", "_")
    local = scratch_root() / study
    run_dir = local / task.name
    if started is not None and not (run_dir / "checkpoint.pt").is_file():
        unpack(started, run_dir)
    result = run_task(replace(task, config={**task.config, "output_dir": str(local)}))
    data = pack(run_dir) if run_dir.is_dir() else b""
    if result.status in ("done", "not_run"):
        shutil.rmtree(run_dir, ignore_errors=True)  # it lives on at the driver; a stopped one stays to resume
        with contextlib.suppress(OSError):
            local.rmdir()  # the study's scratch folder, once no run of it is left on this node
    return result, data


class RayPool(Pool):
    """Runs on a Ray cluster (`address`), or on a local Ray started for the study."""

    def __init__(self, workers: int, address: str | None, events: Events | None = None) -> None:
        super().__init__(workers, events)
        self.address = address
        self.ray = self._connect()
        # max_calls=1: a fresh worker process per run, as locally; max_retries=1: a killed worker is tried again
        self.remote = self.ray.remote(max_retries=1, max_calls=1)(ray_task)

    def _connect(self):
        try:
            import ray
        except ImportError:
            raise NotSupported("executor kind ray needs Ray: pip install 'peftlab[ray]'") from None
        if not ray.is_initialized():
            # Without an address, a Ray of this machine's cores; with one, join that cluster.
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING", configure_logging=False)
        return ray

    def _start(self, task: RunTask):
        started = pack(task.run_dir) if (task.run_dir / "checkpoint.pt").is_file() else None
        threads = task.config["train"]["threads"] or task.threads or 1
        # A run asks for the CPUs its torch threads use, and one GPU where it runs on one.
        gpus = 1 if str(task.config["model"]["device"]).startswith("cuda") else 0
        return self.remote.options(num_cpus=threads, num_gpus=gpus).remote(
            replace(task, config={**task.config, "train": {**task.config["train"], "threads": threads}}), started)

    def _wait(self):
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        return ready[0]

    def _collect(self, task: RunTask, ref) -> RunResult:
        try:
            result, data = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:  # the study was stopped (`_stop`)
            return ended(task, "stopped", f"{task.name}: stopped with the study; a rerun starts it again")
        except Exception as err:  # the task failed twice (a node lost, a worker killed): the study goes on
            return ended(task, "failed", f"Ray task failed: {str(err).splitlines()[0]}")
        if data:
            unpack(data, task.run_dir)
        return result

    def _stop(self, handles: list) -> None:
        for ref in handles:
            self.ray.cancel(ref, force=True)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
