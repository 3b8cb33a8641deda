"""Where and how a job runs: the device, the precision, the memory format and the processes. The
trainers take the device and precision rules from here; the inference jobs (code extraction,
sampling, evaluation) all of it.

- Device: CUDA when there is one, else the CPU; `--device cpu|cuda` chooses, and CUDA asked for
  where there is none is refused with one line.
- Precision (`resolve_precision`): `auto` is bf16 autocast where the
  device computes bf16 natively, fp32 elsewhere. Under autocast the model code keeps in fp32 what
  decides a result: the quantizer's distances and argmin, the prior's head and its softmax, every
  likelihood.
- Memory format: the VQ-VAE and its image batches channels_last, as its trainer runs it (oneDNN's
  convolutions are several times faster on it). PixelSNAIL makes its activations channels_last
  itself, and its cached sampler works on (B, C) vectors.
- TF32: on CUDA, fp32 matmuls and convolutions run in TF32 (`allow_tf32`), for trainers and
  inference alike.
- Denormals: the training loop computes floats below fp32's normal range as zero on the CPU
  (`flush_denormals`, and the training scripts' threads from their start); inference keeps them,
  and the codec refuses a process that does not (its files decode only under the same floats).
- Processes: accelerate's PartialState. Under `accelerate launch` every process runs the same
  job and the job splits its work by `process_index`.

Example:
    >>> runtime = make_runtime("cpu", "auto")          # bf16 on a CPU with AMX or AVX512-BF16
    >>> vqvae = runtime.vqvae(vqvae)                   # on the device, eval mode, channels_last
    >>> with runtime.autocast():
    ...     top_codes, bottom_codes = vqvae.encode(runtime.images(images_uint8))
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from pipelines.data.datasets import to_model_range

DEVICES = ("cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the device computes it natively


def resolve_device(device=None):
    """None -> 'cuda' when CUDA is present, else 'cpu'; refuses a device that is absent."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return device


@dataclass
class Runtime:
    processes: PartialState  # this process's place in the launch: process_index, num_processes, device
    precision: str  # 'bf16' or 'fp32', resolved

    @property
    def device(self) -> torch.device:
        return self.processes.device

    def autocast(self):
        """bf16 autocast when the precision is bf16, else nothing. torch's own, not an Accelerator's:
        accelerate keeps one precision per Python process, and a job here may follow another."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def vqvae(self, model):
        """The VQ-VAE on the device, in eval mode, its weights channels_last."""
        return model.to(self.device, memory_format=torch.channels_last).eval()

    def images(self, images_uint8):
        """uint8 images (B, 3, S, S) -> the model's range [-1, 1] on the device, channels_last.
        They cross to the device as uint8, a quarter of the bytes of floats."""
        images = images_uint8.to(self.device, non_blocking=True)
        return to_model_range(images).contiguous(memory_format=torch.channels_last)


def make_runtime(device=None, precision="auto"):
    """A Runtime on `device` (None: CUDA when present) under `precision` ('auto', 'bf16', 'fp32')."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    processes = PartialState(cpu=device == "cpu")
    check_processes(processes)
    return Runtime(processes, precision)


def one_process_runtime(script, device=None, precision="auto"):
    """make_runtime for a script that runs in one process: `accelerate launch` is refused in one line."""
    machine = make_runtime(device, precision)
    if machine.processes.num_processes > 1:
        raise ValueError(f"{script} runs in one process: start it with python, not accelerate launch")
    return machine


def add_runtime_arguments(parser, precision_default="auto", precision_note=""):
    """--device and --precision, as every inference script takes them."""
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="where the models run (default: cuda when present, else cpu)")
    parser.add_argument("--precision", default=precision_default, choices=PRECISIONS,
                        help="auto: bf16 autocast where the device computes bf16 natively (AMX, recent GPUs); "
                        "the quantizer's distances and every likelihood always compute in fp32" + precision_note)


def cpu_info():
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...), {} where there is
    no such file: the one reader of it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_flags():
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return set(cpu_info().get("flags", "").split())


def cpu_supports_bf16():
    """True when the CPU has native bf16 arithmetic (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(precision, device=None):
    """'auto' -> 'bf16' where the device ('cpu' or 'cuda'; None: CUDA when present) computes bf16
    natively, else 'fp32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def allow_tf32():
    """fp32 matmuls and convolutions on CUDA in TF32 (inputs rounded to 10 mantissa bits, sums in
    fp32): several times the fp32 rate on tensor cores. bf16 autocast rounds far more; where exact
    fp32 matters (tests comparing with the CPU) it is switched off around that code."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def denormal_probe(n=1):
    """`n` copies of a denormal (1.5e-39, below fp32's 1.2e-38), made from its bits: no float
    arithmetic, so no thread's flag touches it."""
    return torch.full((n,), 1 << 20, dtype=torch.int32).view(torch.float32)


def flushes_denormals():
    """Whether this thread computes denormal floats as zero (one multiply, on this thread alone)."""
    return (denormal_probe() * 1.0).view(torch.int32).item() == 0


def some_thread_flushes_denormals():
    """Whether this thread or any intra-op thread computes denormals as zero: a multiply split among
    all of them (an elementwise op gives each thread one share of at least 32,768 elements, ATen's
    grain size: twice that per thread reaches them all). Starts the threads."""
    probe = denormal_probe(2 * 32768 * torch.get_num_threads())
    return bool(((probe * 1.0).view(torch.int32) == 0).any())


@contextmanager
def flush_denormals():
    """This thread computes denormal floats as zero (FTZ and DAZ) inside the block: as a model grows
    confident, the far tails of its likelihood and their gradients fall below fp32's normal range,
    where a CPU computes many times slower (bench/results/denormals.md). The flag belongs to a
    thread and a thread starts with its creator's: the intra-op threads are started before it is set,
    so that none keeps it after the block (a process that only trains flushes them too, from its
    start: `flush_denormals_in_thread_pool`). Enter after the options are checked: the flag also
    makes Python's own float arithmetic read denormals as zero."""
    previous = flushes_denormals()
    some_thread_flushes_denormals()  # the threads exist before the flag is set
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def flush_denormals_in_thread_pool():
    """For a process that trains, first thing: the intra-op threads, started here, compute denormals
    as zero for the process's life; this thread is left as it was (the trainers flush it while they
    train, `flush_denormals` in the training loop). Threads that already exist are not changed."""
    previous = flushes_denormals()
    torch.set_flush_denormal(True)
    some_thread_flushes_denormals()  # starts the threads, which take this thread's flag
    torch.set_flush_denormal(previous)


def check_denormals_kept(what):
    """Refuses, in one line, a process where some thread computes denormals as zero: `what` computes
    them as the files it must agree with were computed."""
    if some_thread_flushes_denormals():
        raise ValueError(f"{what} needs denormal floats computed as such, and a thread of this process flushes them "
                         "to zero (torch.set_flush_denormal(True), or a training script's threads): run it in a "
                         "process of its own")


def check_processes(state):
    """Refuses a launch whose processes do not see each other (an Accelerator or accelerate's
    PartialState); gives each CPU process its share of the cores. Every job, trainer or inference,
    passes here once: on CUDA it turns TF32 on (allow_tf32)."""
    if state.device.type == "cuda":
        allow_tf32()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if state.num_processes != world_size:
        raise RuntimeError(
            f"launched as {world_size} processes but accelerate sees {state.num_processes}: "
            "on CPU use `accelerate launch --multi_gpu --num_processes N` (this code selects the CPU) or torchrun"
        )
    if state.device.type == "cpu" and state.num_processes > 1:
        # several processes with several threads each thrash the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
