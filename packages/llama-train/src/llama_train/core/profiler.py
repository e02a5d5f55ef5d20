"""A light, always-on step profiler and an opt-in torch.profiler window (the `profile` section).

Light profiler: one CSV row per logged step in `<run dir>/profile.csv`, where
the time went since the previous row and how fast and big the run is:

    step, time, wall_s, steps, data_wait_s, forward_backward_s, optimizer_s,
    eval_s, checkpoint_s, tokens_per_s, tflops, mfu, gpu_mem_peak_allocated_mb,
    gpu_mem_peak_reserved_mb, rss_mb, hostname

Phases are timed on the host with `perf_counter`; on a GPU, forward+backward
and the optimizer are timed with CUDA events (the host only queues kernels),
read when the row is written, where the loop synchronises anyway. `tflops`
is the model FLOPs rate per device (6 x matmul parameters per token for
forward and backward, plus 12 x layers x dim x context for attention), and
`mfu` divides it by the device's peak (:data:`PEAK_TFLOPS`, or
`profile.peak_tflops`; none on the CPU unless given). Costs: a few
perf_counter calls and CUDA events per step.

Resume: rows after the checkpoint's step are dropped (they are replayed), the
running totals come back from the checkpoint (:meth:`StepProfiler.state_dict`),
so a resumed run's file reads like one of a run never interrupted.

torch.profiler window: with `profile.start: S`, steps S+1 .. S+`profile.steps`
are recorded on every rank into `<run dir>/profile/trace_step<S>_rank<r>.json`
(Chrome trace format: chrome://tracing or https://ui.perfetto.dev), with a
CUDA memory snapshot beside it when `profile.memory` is set
(https://pytorch.org/memory_viz). Its files go to wandb when wandb is on.
"""

from __future__ import annotations

import contextlib
import csv
import io
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from llama_train.rundir import atomic_write

PROFILE_FILENAME = "profile.csv"
TRACE_DIR = "profile"
PHASES = ("data_wait", "forward_backward", "optimizer", "eval", "checkpoint")
COLUMNS = (
    "step",
    "time",
    "wall_s",
    "steps",
    *(f"{phase}_s" for phase in PHASES),
    "tokens_per_s",
    "tflops",
    "mfu",
    "gpu_mem_peak_allocated_mb",
    "gpu_mem_peak_reserved_mb",
    "rss_mb",
    "hostname",
)
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins (order matters).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


class ProfileConfig(BaseModel):
    """The light profiler (on by default) and the torch.profiler window (the `profile` section)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="write profile.csv, one row per logged step")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="peak TFLOP/s of one device for mfu; None = the built-in table of GPUs "
        "(no mfu on the CPU or an unknown GPU)",
    )
    start: int | None = Field(
        None,
        ge=0,
        description="record a torch.profiler trace of the steps after this one (per rank, "
        "in <run dir>/profile/); None = no trace",
    )
    steps: int = Field(3, gt=0, description="steps in the torch.profiler window")
    memory: bool = Field(
        False, description="with a trace: CUDA memory snapshot (pickle for pytorch.org/memory_viz)"
    )


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """One device's peak: the configured figure, else the table's for this GPU, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def flops_per_token(
    matmul_parameters: int, n_layers: int, dim: int, context: int, *, training: bool = True
) -> float:
    """Model FLOPs per predicted token (PaLM appendix B): 6N + 12 L d T for training.

    N counts the parameters used in matmuls (the output head included, the input
    embedding lookup not); the attention term counts the score and value
    products over a context of T tokens, not halved for the causal mask. A
    forward alone is a third of it.
    """
    total = 6.0 * matmul_parameters + 12.0 * n_layers * dim * context
    return total if training else total / 3.0


class _Timer:
    """Seconds spent in one phase since the last read: host clock, or CUDA events on a GPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.cuda:
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            yield
            end.record()
            self._events.append((begin, end))
            return
        started = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - started

    def read(self) -> float:
        """The phase's seconds since the last read (waits for the GPU's recorded events)."""
        if self._events:
            self._events[-1][1].synchronize()
        seconds = self.seconds + sum(b.elapsed_time(e) for b, e in self._events) / 1000.0
        self.seconds, self._events = 0.0, []
        return seconds


class StepProfiler:
    """Times the loop's phases and writes a row of `profile.csv` per logged step (rank 0).

    The loop wraps phases in :meth:`phase` and calls :meth:`row` at each
    logged step; every other method is bookkeeping. Disabled (another rank, or
    `profile.enabled: false`), every call does nothing.
    """

    def __init__(
        self,
        run_dir: Path,
        config: ProfileConfig,
        *,
        device: torch.device,
        flops_per_token: float,
        world_size: int = 1,
        enabled: bool = True,
    ) -> None:
        self.path = Path(run_dir) / PROFILE_FILENAME
        self.config = config
        self.device = device
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.enabled = enabled and config.enabled
        self.peak = peak_tflops(device, config.peak_tflops)
        gpu = device.type == "cuda"
        # The data wait is host time by nature: the loop blocks on the loader.
        self._timers = {phase: _Timer(gpu and phase != "data_wait") for phase in PHASES}
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last_step = 0
        self._window_started = time.perf_counter()
        self._window_steps = self._window_tokens = 0
        self._hostname = socket.gethostname()

    # -- the loop's calls -----------------------------------------------------

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a block as phase `name` (one of :data:`PHASES`)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return self._timers[name].measure()

    def step_done(self, tokens: int) -> None:
        """Count an optimizer step and its predicted tokens (all ranks)."""
        self._window_steps += 1
        self._window_tokens += tokens

    def row(self, step: int) -> dict[str, Any] | None:
        """Write the row of `step`: the window since the previous row."""
        if not self.enabled:
            return None
        tokens = self._window_tokens
        seconds = {phase: timer.read() for phase, timer in self._timers.items()}
        wall = time.perf_counter() - self._window_started
        tokens_per_s = tokens / wall if wall > 0 else 0.0
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        record: dict[str, Any] = {
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_s": wall,
            "steps": self._window_steps,
            **{f"{phase}_s": value for phase, value in seconds.items()},
            "tokens_per_s": tokens_per_s,
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "gpu_mem_peak_allocated_mb": None,
            "gpu_mem_peak_reserved_mb": None,
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "hostname": self._hostname,
        }
        if self.device.type == "cuda":
            record["gpu_mem_peak_allocated_mb"] = (
                torch.cuda.max_memory_allocated(self.device) / 2**20
            )
            record["gpu_mem_peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        for phase, value in seconds.items():
            self.totals[phase] += value
        self._append(record)
        self.last_step = step
        self._window_started = time.perf_counter()
        self._window_steps = self._window_tokens = 0
        return record

    # -- files and resume -----------------------------------------------------

    def start(self, resume_step: int | None) -> None:
        """Begin a session: a fresh file, or the rows up to the checkpoint's step kept."""
        self._window_started = time.perf_counter()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
            return
        rows = [row for row in read_profile(self.path) if int(row["step"]) <= resume_step]
        _write_rows(self.path, rows)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the running totals (a checkpoint without them starts from zero)."""
        if state:
            self.totals.update(state.get("totals", {}))
            self.last_step = int(state.get("last_step", 0))

    def _append(self, record: dict[str, Any]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({key: _cell(value) for key, value in record.items()})


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_profile(path: str | Path) -> list[dict[str, str]]:
    """The rows of a profile.csv (a run directory or the file); a torn last row is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_FILENAME
    if not path.is_file():
        return []
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [row for row in rows if None not in row.values() and row.get("hostname")]


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


class TraceWindow:
    """torch.profiler over steps start+1 .. start+steps, a trace per rank; then `on_file(path)`.

    Driven by the loop: :meth:`before_step` with the step about to run,
    :meth:`after_step` when it is done. A run resumed past the window records
    nothing.
    """

    def __init__(
        self,
        run_dir: Path,
        config: ProfileConfig,
        *,
        device: torch.device,
        rank: int,
        on_file: Callable[[Path], None] = lambda path: None,
    ) -> None:
        self.config = config
        self.device = device
        self.rank = rank
        self.directory = Path(run_dir) / TRACE_DIR
        self.on_file = on_file
        self._profiler: torch.profiler.profile | None = None
        self._step_range: torch.profiler.record_function | None = None
        self._recorded = 0

    def __enter__(self) -> TraceWindow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def before_step(self, step: int) -> None:
        """`step` is the number of steps done; the window opens after `profile.start`.

        Each recorded step is a range named `train_step#<n>` in the trace.
        """
        if self._profiler is not None:
            self._step_range = torch.profiler.record_function(f"train_step#{step + 1}")
            self._step_range.__enter__()
            return
        if self.config.start is None or step != self.config.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.config.memory:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=self.config.memory
        )
        self._profiler.__enter__()
        self._recorded = 0
        self._step_range = torch.profiler.record_function(f"train_step#{step + 1}")
        self._step_range.__enter__()

    def after_step(self) -> list[Path]:
        """Close the window after its last step; return the files written (else [])."""
        if self._profiler is None:
            return []
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        self._recorded += 1
        if self._recorded < self.config.steps:
            return []
        return self.close()

    def close(self) -> list[Path]:
        """Stop recording now and write the files (a window cut short by the run's end)."""
        if self._profiler is None:
            return []
        profiler, self._profiler = self._profiler, None
        if self._step_range is not None:  # a step interrupted by an error
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        profiler.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"step{self.config.start}_rank{self.rank}"
        trace = self.directory / f"trace_{stem}.json"
        profiler.export_chrome_trace(str(trace))
        files = [trace]
        if self.device.type == "cuda" and self.config.memory:
            snapshot = self.directory / f"memory_{stem}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            files.append(snapshot)
        for path in files:
            self.on_file(path)
        return files
