"""The sample jobs of scripts/sample.py: a `SampleJob` drawn in memory by one process, or into a
sample directory (`pipelines.store.samples`) shared by the processes and resumed where it stopped."""

from contextlib import nullcontext
from dataclasses import asdict

import torch

from pipelines.infer.generation import make_samples
from pipelines.store import samples as sample_dir
from pipelines.store.checkpoint import resolve_checkpoint
from pipelines.store.codes import file_sha256
from pipelines.store.outputs import output_dir


def sample_in_memory(pipeline, runtime, job, batch_size):
    """All samples in one process, kept in memory: {images, and each level's codes} arrays
    (pipelines.store.samples.code_names: top_codes, bottom_codes for two levels)."""
    if runtime.processes.num_processes > 1:
        raise ValueError("several processes write their samples to --out-dir: give one")
    batches = []
    make_samples(pipeline, runtime, job, list(range(job.total)), batch_size,
                 lambda indices, labels, *arrays: batches.append(arrays))
    return {name: torch.cat([batch[k] for batch in batches]).numpy()
            for k, name in enumerate(("images", *sample_dir.code_names(len(pipeline.priors))))}


def sample_to_directory(pipeline, runtime, job, paths, out_dir, batch_size, read_back=True):
    """The samples of `job` not yet in `out_dir`, shared by the processes; -> all of them, read
    back from samples.npz on the main process when `read_back` ({} if not; None on the other
    processes). `paths`: the checkpoints of the pipeline, {"vqvae", and each level's name}, whose hashes
    the directory records so that a re-run continues only the same job."""
    processes = runtime.processes
    # a job that fails before its first sample leaves nothing (no job file to refuse the corrected command)
    with output_dir(out_dir, scaffolding=(sample_dir.JOB_FILE,)) if processes.is_main_process else nullcontext():
        if processes.is_main_process:
            sample_dir.start(out_dir, {
                **{f"{name}_sha256": file_sha256(resolve_checkpoint(path)) for name, path in paths.items()},
                "labels": list(job.labels), "per_label": job.per_label, "seed": job.seed,
                **asdict(job.drawing), "precision": runtime.precision,
            })
        processes.wait_for_everyone()
        todo = sorted(set(range(job.total)) - sample_dir.done(out_dir))
        if processes.is_main_process and len(todo) < job.total:
            print(f"{out_dir}: {job.total - len(todo)} of {job.total} samples written already")
        make_samples(pipeline, runtime, job, todo, batch_size,
                     lambda *batch: sample_dir.write_batch(out_dir, *batch))
        processes.wait_for_everyone()
        if not processes.is_main_process:
            return None
        written = sample_dir.finish(out_dir, job.total)
    return sample_dir.load(written) if read_back else {}
