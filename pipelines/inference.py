"""Where and how the inference jobs run (code extraction, sampling, evaluation): the device, the
precision, the memory format and the processes.

- Device: CUDA when there is one, else the CPU; `--device cpu|cuda` chooses, and CUDA asked for
  where there is none is refused with one line.
- Precision: the trainers' rule (`runtime.resolve_precision`): `auto` is bf16 autocast where the
  device computes bf16 natively, fp32 elsewhere. Under autocast the model code keeps in fp32 what
  decides a result: the quantizer's distances and argmin, the prior's head and its softmax, every
  likelihood.
- Memory format: the VQ-VAE and its image batches channels_last, as its trainer runs it (oneDNN's
  convolutions are several times faster on it). PixelSNAIL makes its activations channels_last
  itself, and its cached sampler works on (B, C) vectors.
- Processes: accelerate's PartialState. Under `accelerate launch` every process runs the same
  job and the job splits its work by `process_index`.

Example:
    >>> runtime = make_runtime("cpu", "auto")          # bf16 on a CPU with AMX or AVX512-BF16
    >>> vqvae = runtime.vqvae(vqvae)                   # on the device, eval mode, channels_last
    >>> with runtime.autocast():
    ...     top_codes, bottom_codes = vqvae.encode(runtime.images(images_uint8))
"""

from dataclasses import dataclass

import torch
from accelerate import PartialState

from pipelines import runtime
from pipelines.data import to_model_range

DEVICES = ("cpu", "cuda")


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
    precision = runtime.resolve_precision(precision, device)
    processes = PartialState(cpu=device == "cpu")
    runtime.check_processes(processes)
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
    parser.add_argument("--precision", default=precision_default, choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 autocast where the device computes bf16 natively (AMX, recent GPUs); "
                        "the quantizer's distances and every likelihood always compute in fp32" + precision_note)
