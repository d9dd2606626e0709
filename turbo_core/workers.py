"""Persistent sequence-parallel worker processes: one per device, models kept loaded.

The ComfyUI Multi-GPU node runs on this (any host process can). The workers are
started with torch.multiprocessing (spawn) and form one torch.distributed group
(NCCL on GPUs, gloo on the CPU) that samples with turbo_core.parallel. The host is
not a rank: it puts each job on every worker's queue and rank 0 answers with progress
and the latent. So the host never waits inside a collective; it watches the workers'
exit codes while it waits, and if one dies it stops the others and raises an error
that names the device. Each worker loads the model files by path once and keeps
them on its device between jobs.

    group = WorkerGroup(["cuda:0", "cuda:1"])      # or get_group(...) for the shared one
    latent = group.sample([ModelFile(path, "bf16")], context, shape=..., steps=4, seed=1, ...)
    group.shutdown()
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger("turbo_core")

START_TIMEOUT_S = 300.0  # spawning, importing torch and joining the group
ERROR_GRACE_S = 5.0  # after one worker fails, how long the others get to report theirs
CANCEL_GRACE_S = 60.0  # after a cancel, how long the workers get to stop at the next block
POLL_S = 0.1


class WorkerError(RuntimeError):
    """A worker died or the group failed; the group has been shut down (the next job restarts it)."""


class Cancelled(Exception):
    """Raised on every rank, at the same block, when the host cancels a job."""


@dataclass(frozen=True)
class ModelFile:
    """A DiT file as the workers load it (turbo_core.models.dit_loader.load_dit arguments)."""

    path: str
    dtype: str = "bf16"
    linear: str = "auto"

    @classmethod
    def of(cls, model) -> "ModelFile":
        """The file a loaded WanDiT came from (its load report's source), same dtype."""
        path = model.load_report.source if model.load_report is not None else None
        if not path or not os.path.isfile(path):
            raise ValueError(f"multi-GPU workers load models from files; this model came from {path!r}")
        return cls(os.path.abspath(path), str(model.compute_dtype).replace("torch.", ""))


def parse_devices(spec) -> list[torch.device]:
    """"0,1" or "cuda:0,cuda:1" -> GPUs; "cpu,cpu" -> CPU processes (gloo; for tests). Checked."""
    items = [str(s).strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not items:
        raise ValueError("devices: give the GPUs to use, e.g. 0,1 (or cpu,cpu to try it on the CPU)")
    devices = []
    for item in items:
        try:
            devices.append(torch.device("cuda", int(item)) if item.isdigit() else torch.device(item))
        except (RuntimeError, ValueError):
            raise ValueError(f"devices: {item!r} is not a device; use GPU numbers like 0,1 or cpu,cpu") from None
    kinds = {d.type for d in devices}
    if len(kinds) > 1 or kinds - {"cuda", "cpu"}:
        raise ValueError(f"devices: use only GPUs (0,1,...) or only cpu, not {spec!r}")
    if kinds == {"cuda"}:
        devices = [torch.device("cuda", d.index or 0) for d in devices]
        if len(set(devices)) < len(devices):
            raise ValueError(f"devices: each GPU can be used once, got {spec!r}")
        count = torch.cuda.device_count()
        missing = [str(d.index) for d in devices if d.index >= count]
        if missing:
            raise ValueError(f"devices: GPU {', '.join(missing)} not found; this machine has {count} visible GPU(s)"
                             + ("" if count else " (use cpu,cpu to try multi-process sampling on the CPU)"))
    return devices


# ---------------------------------------------------------------------------
# the worker process

def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose host is gone (killed, crashed) exits instead of holding its GPU forever."""

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="turbo-parent-watch", daemon=True).start()


def _describe(err: BaseException) -> dict:
    import traceback

    from .io.checkpoint import CheckpointError

    return {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc(),
            "clean": isinstance(err, (ValueError, FileNotFoundError, CheckpointError))}


def _load(cache: dict, files: list[ModelFile]) -> list:
    """The job's models, loaded once (CPU first; sample_latent puts them on the device and,
    with offload_models=False, leaves them there). Models no job asks for any more are dropped."""
    from .models.dit_loader import load_dit

    def key(f):
        st = os.stat(f.path)
        return f, st.st_mtime_ns, st.st_size

    wanted = [key(f) for f in files]
    for k in list(cache):
        if k not in wanted:
            del cache[k]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for k in wanted:
        if k not in cache:
            cache[k] = load_dit(k[0].path, device="cpu", dtype=k[0].dtype, linear=k[0].linear)
    return [cache[k] for k in wanted]


def _run_job(sp, cache: dict, job: dict, cancel, report) -> torch.Tensor:
    from .pipeline import sample_latent

    experts = _load(cache, job["models"])

    def between_blocks():  # every rank stops at the same block: the decision is all-reduced
        if sp.agree(cancel.is_set()):
            raise Cancelled()

    def on_step(step, total, x):
        if sp.is_lead:
            report("progress", (step + 1, total))

    for m in experts:
        m.between_blocks = between_blocks
    try:
        return sample_latent(experts, job["context"], y=job["y"], shape=job["shape"], steps=job["steps"],
                             sigma_max=job["sigma_max"], seed=job["seed"], boundary=job["boundary"], ode=job["ode"],
                             attention=job["attention"], sla_topk=job["sla_topk"], noise_device=job["noise_device"],
                             callback=on_step, offload_models=False, parallel=sp)
    finally:
        for m in experts:
            m.between_blocks = None


def _worker(rank: int, devices: list[str], store: str, timeout: float, commands, results, cancel,
            parent_pid: int) -> None:
    """One rank: join the group, then run jobs from `commands` until None arrives."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host, which stops the workers itself
    _exit_with_parent(parent_pid)
    from .parallel import ParallelError, init_group, shutdown

    if rank == 0:  # the load reports, once, in the host's console
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)

    device = torch.device(devices[rank])
    if device.type == "cpu":  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    try:
        sp = init_group(rank=rank, world_size=len(devices), device=device, init_method=f"file://{store}",
                        timeout=timeout)
    except BaseException as err:  # noqa: BLE001 - reported to the host
        results.put(("start", rank, "error", _describe(err)))
        return
    results.put(("start", rank, "ready", os.getpid()))
    cache: dict = {}
    with torch.inference_mode():
        while True:
            msg = commands.get()
            if msg is None:
                break
            job_id, job = msg
            try:
                latent = _run_job(sp, cache, job, cancel, lambda kind, data: results.put((job_id, rank, kind, data)))
                # numpy: pickled by value, so the host can read it even if this process ends right after
                results.put((job_id, rank, "done", latent.cpu().numpy() if sp.is_lead else None))
            except Cancelled:
                results.put((job_id, rank, "cancelled", None))
            except BaseException as err:  # noqa: BLE001 - reported to the host
                results.put((job_id, rank, "error", _describe(err)))
                if isinstance(err, (ParallelError, KeyboardInterrupt)):
                    break  # the group is broken: leave, the host restarts it
    del cache
    shutdown()


# ---------------------------------------------------------------------------
# the host side

@contextmanager
def _spawn_environment():
    """What a spawned worker inherits: the engine importable by name, and not the host's __main__.

    multiprocessing's spawn re-runs the parent's __main__ script in every child; in ComfyUI
    that is main.py, which would parse ComfyUI's command line, run prestartup scripts and
    import all of ComfyUI in each worker. Hiding __main__'s file for the moment of start()
    leaves the child with just the worker function. The engine's parent folder is added
    (at the end) to the sys.path the child copies, because ComfyUI loads this pack by path.
    """
    main = sys.modules.get("__main__")
    saved = {a: main.__dict__[a] for a in ("__file__", "__spec__") if main is not None and a in main.__dict__}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    added = root not in sys.path
    try:
        if "__file__" in saved:
            del main.__file__
        if "__spec__" in saved:
            main.__spec__ = None
        if added:
            sys.path.append(root)
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
        if added and root in sys.path:
            sys.path.remove(root)


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (often: the system ran out of memory)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class WorkerGroup:
    """N spawned ranks on `devices` that keep their models between jobs."""

    _ids = itertools.count(1)

    def __init__(self, devices, *, timeout: float | None = None, start_timeout: float = START_TIMEOUT_S):
        from .parallel import default_timeout

        self.devices = parse_devices(devices)
        self.timeout = timeout or default_timeout()
        self.start_timeout = start_timeout
        self.processes: list = []
        self._dir = None

    def __repr__(self):
        return f"WorkerGroup({', '.join(map(str, self.devices))}; pids {self.pids})"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def running(self) -> bool:
        return bool(self.processes) and all(p.exitcode is None for p in self.processes)

    def _where(self, rank: int) -> str:
        return f"the worker for {self.devices[rank]} (rank {rank} of {len(self.devices)})"

    def start(self) -> "WorkerGroup":
        if self.running:
            return self
        self.shutdown()
        ctx = torch.multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="turbo-workers-")
        self.results = ctx.Queue()
        self.cancel = ctx.Event()
        self.commands = [ctx.Queue() for _ in self.devices]
        args = ([str(d) for d in self.devices], os.path.join(self._dir, "store"), self.timeout)
        with _spawn_environment():
            for rank in range(len(self.devices)):
                p = ctx.Process(target=_worker, name=f"turbo-worker-{rank}", daemon=True,
                                args=(rank, *args, self.commands[rank], self.results, self.cancel, os.getpid()))
                p.start()
                self.processes.append(p)
        ready: set[int] = set()
        deadline = time.monotonic() + self.start_timeout
        while len(ready) < len(self.devices):
            msg = self._next(deadline, "start")
            if msg is None:
                continue
            _, rank, kind, data = msg
            if kind == "error":
                self.shutdown(grace=2)
                raise WorkerError(f"TurboDiffusion multi-GPU: {self._where(rank)} could not start: "
                                  f"{data['type']}: {data['message']}")
            ready.add(rank)
        log.info("TurboDiffusion multi-GPU: %d workers on %s (pids %s)", len(self.devices),
                 ", ".join(map(str, self.devices)), ", ".join(map(str, self.pids)))
        return self

    def _next(self, deadline: float, what: str):
        """The next message, None on a quiet poll; a dead worker or the deadline raise WorkerError."""
        try:
            return self.results.get(timeout=POLL_S)
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(self.processes) if p.exitcode is not None]
        if dead:  # name the one that crashed, not one that left cleanly because of it
            self._fail(max(dead, key=lambda r: self.processes[r].exitcode != 0), what)
        if time.monotonic() > deadline:
            self.shutdown(grace=2)
            raise WorkerError(f"TurboDiffusion multi-GPU: the workers did not answer within "
                              f"{self.start_timeout:.0f} s ({what})")
        return None

    def _fail(self, rank: int, what: str):
        how = _how_it_ended(self.processes[rank].exitcode)
        self.shutdown(grace=2)
        raise WorkerError(f"TurboDiffusion multi-GPU: {self._where(rank)} {how} during {what}. "
                          f"All workers were stopped; the next run starts them again.")

    def sample(self, models: list[ModelFile], context: torch.Tensor, *, shape, steps: int, sigma_max: float,
               seed: int, y: torch.Tensor | None = None, boundary: float = 0.9, ode: bool = False,
               attention: str = "auto", sla_topk: float = 0.1, noise_device: str = "cpu",
               on_step=None, poll=None) -> torch.Tensor:
        """One rCM run on all workers; returns the float32 latent on the CPU.

        on_step(done, total) after each step and poll() every 0.1 s run here, in the caller's
        thread; if either raises (e.g. a user interrupt), the workers stop at their next block
        and the exception is re-raised (the group stays up).
        """
        if not self.running:
            if self.processes:
                log.warning("TurboDiffusion multi-GPU: a worker had exited (%s); restarting the group",
                            "; ".join(f"{self.devices[r]}: {_how_it_ended(p.exitcode)}"
                                      for r, p in enumerate(self.processes) if p.exitcode is not None))
            self.start()
        job_id = next(self._ids)
        job = dict(models=list(models), shape=tuple(int(s) for s in shape), steps=steps, sigma_max=sigma_max,
                   seed=seed, boundary=boundary, ode=ode, attention=attention, sla_topk=sla_topk,
                   noise_device=noise_device)
        self.cancel.clear()
        for rank, q in enumerate(self.commands):  # only rank 0 gets the tensors; it broadcasts them
            q.put((job_id, dict(job, context=context if rank == 0 else None, y=y if rank == 0 else None)))

        pending, errors = set(range(len(self.devices))), {}
        latent, interrupt, error_at, cancel_at = None, None, None, None
        while pending:
            msg = self._next(float("inf"), "sampling")
            if msg is not None and msg[0] == job_id:
                _, rank, kind, data = msg
                if kind == "progress" and on_step is not None and interrupt is None:
                    try:
                        on_step(*data)
                    except BaseException as err:  # noqa: BLE001 - re-raised once the workers stopped
                        interrupt, cancel_at = err, time.monotonic()
                        self.cancel.set()
                elif kind in ("done", "cancelled", "error"):
                    pending.discard(rank)
                    if kind == "done" and rank == 0:
                        latent = torch.from_numpy(data)
                    if kind == "error":
                        errors[rank] = data
                        error_at = error_at or time.monotonic()
            if poll is not None and interrupt is None:
                try:
                    poll()
                except BaseException as err:  # noqa: BLE001
                    interrupt, cancel_at = err, time.monotonic()
                    self.cancel.set()
            now = time.monotonic()
            if pending and error_at is not None and now - error_at > ERROR_GRACE_S:
                break  # the others are stuck in a collective with the failed rank
            if pending and cancel_at is not None and now - cancel_at > CANCEL_GRACE_S:
                self.shutdown(grace=2)
                raise interrupt
        if errors:
            rank = min(errors)
            err = errors[rank]
            if not pending and all(e["clean"] for e in errors.values()):
                # the same refusal on every rank, before any collective: the group is fine
                raise (FileNotFoundError if err["type"] == "FileNotFoundError" else ValueError)(err["message"])
            log.error("TurboDiffusion multi-GPU: %s failed:\n%s", self._where(rank), err["traceback"])
            self.shutdown(grace=2)
            raise WorkerError(f"TurboDiffusion multi-GPU: {self._where(rank)} failed during sampling: "
                              f"{err['type']}: {err['message']}. All workers were stopped; the next run starts "
                              f"them again.")
        if interrupt is not None:
            raise interrupt
        return latent

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop the workers: ask, then terminate, then kill. Safe to call twice."""
        if not self.processes:
            return
        for q in self.commands:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.exitcode is None:
                p.terminate()
                p.join(2)
            if p.exitcode is None:
                p.kill()
                p.join(2)
        for q in [*self.commands, self.results]:
            q.cancel_join_thread()
            q.close()
        self.processes = []
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        log.info("TurboDiffusion multi-GPU: workers stopped")


# ---------------------------------------------------------------------------
# the host's one group

_group: WorkerGroup | None = None
_lock = threading.Lock()
_atexit_registered = False


def get_group(devices) -> WorkerGroup:
    """The running group on exactly `devices` (started if needed; a group on other devices is stopped)."""
    global _group, _atexit_registered
    wanted = parse_devices(devices)
    with _lock:
        if _group is not None and _group.devices != wanted:
            _group.shutdown()
            _group = None
        if _group is None:
            _group = WorkerGroup(wanted)
        if not _atexit_registered:
            atexit.register(shutdown_all)
            _atexit_registered = True
        return _group.start()


def shutdown_all() -> None:
    """Stop the host's workers (ComfyUI's "free models", the host's exit)."""
    global _group
    with _lock:
        if _group is not None:
            _group.shutdown()
            _group = None


def current_group() -> WorkerGroup | None:
    return _group
