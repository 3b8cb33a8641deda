"""What more than one benchmark uses; no benchmark imports another.

  machine    the machine's description, other processes' CPU use, paths as results files record them
  timing     variants interleaved, a sampler's draws timed, the matmul peak, attention FLOPs on the CPU
  crops      a pixel run of the real trainer to a mark, the crops it is scored on, and its bits/dim there
  models     random images and model inputs, the other held-out photo, precision, the quick VQ-VAE and
             its extraction step
  processes  running other programs, alone or several at once, their output to files (never a pipe)
  report     the command-line helpers, log lines, tables and results files

The benchmarks import these names from here.
"""

from bench.common.crops import (CROP_SEED, GREY_DATA, GREY_PHOTOS, OTHER_CROPS, grey_photo, photo_crops, run_bits,
                                test_images, train_pixel_run, write_grey_folder, write_pngs)
from bench.common.machine import (ROOT, OtherCpuUse, cpu_model, load_average, machine_info, recorded_command,
                                  recorded_path)
from bench.common.models import (VQVAE_QUICK_MODEL, autocast, channels_last, default_other_photos, random_inputs,
                                 random_pixels, vqvae_extract)
from bench.common.processes import PopenToFiles, last_line_value, run_command, run_script, run_together
from bench.common.report import (Report, add_common_arguments, add_out_argument, add_quick_argument, apply_defaults,
                                 log, machine_lines, markdown_table, pyplot, results_record, seconds, text_table,
                                 write_results)
from bench.common.timing import (CPU_ATTENTION_FLOPS, MATMUL_SHAPES, QUICK_MATMUL_SHAPES, SAMPLING_SCALING,
                                 DrawRecorder, StopSampling, measure_matmul_peak, paired_speedups, prefix_timing,
                                 time_interleaved)

__all__ = [
    "CROP_SEED", "GREY_DATA", "GREY_PHOTOS", "OTHER_CROPS", "grey_photo", "photo_crops", "run_bits", "test_images",
    "train_pixel_run", "write_grey_folder", "write_pngs",
    "ROOT", "OtherCpuUse", "cpu_model", "load_average", "machine_info", "recorded_command", "recorded_path",
    "VQVAE_QUICK_MODEL", "autocast", "channels_last", "default_other_photos", "random_inputs", "random_pixels",
    "vqvae_extract",
    "PopenToFiles", "last_line_value", "run_command", "run_script", "run_together",
    "Report", "add_common_arguments", "add_out_argument", "add_quick_argument", "apply_defaults", "log",
    "machine_lines", "markdown_table", "pyplot", "results_record", "seconds", "text_table", "write_results",
    "CPU_ATTENTION_FLOPS", "MATMUL_SHAPES", "QUICK_MATMUL_SHAPES", "SAMPLING_SCALING", "DrawRecorder", "StopSampling",
    "measure_matmul_peak", "paired_speedups", "prefix_timing", "time_interleaved",
]
