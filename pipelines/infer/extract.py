"""Code extraction: a VQ-VAE encodes a dataset into a code database (`pipelines.store.codes`),
resumably, on one or several processes."""

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast, gather
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pipelines.data.datasets import absolute_spec, load_dataset
from pipelines.device import make_runtime, resolve_device
from pipelines.store.checkpoint import load_vqvae, resolve_checkpoint
from pipelines.store.codes import (DEFAULT_MAP_SIZE, FORMAT, META_KEY, PLAN_KEY, TWO_LEVELS, CodeStoreError,
                                   CodeWriter, check_layout, encode_records, file_sha256, format_version, json_bytes,
                                   layout_levels, plan_fields, record_key, record_size)


def count_classes(dataset: Dataset) -> int:
    """Largest label + 1 over the dataset, read without loading images; 0 when it lists no labels.

    The datasets of pipelines.data.datasets keep their labels in `.labels`, under Subset and ConcatDataset.
    """
    labels = dataset_labels(dataset)
    return int(labels.max()) + 1 if labels is not None and len(labels) else 0


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """The labels (N,) of a dataset of pipelines.data.datasets, read without loading images; None if it lists none."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[list(dataset.indices)]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else torch.cat(parts)
    labels = getattr(dataset, "labels", None)
    return None if labels is None else torch.as_tensor(labels)


def extract_codes(
    encode, dataset: Dataset, out, plan: dict, batch_size: int = 64, workers: int = 0,
    progress: bool = True, map_size: int = DEFAULT_MAP_SIZE, processes: PartialState | None = None,
) -> int:
    """Encodes `dataset` into the code database `out`, resuming a run that was stopped; -> the count.

    `encode(images)` maps uint8 images (B, 3, S, S) to one code grid per level, top first:
    (top_codes (B, Ht, Wt), bottom_codes (B, Hb, Wb)) for two levels; `dataset` yields (image uint8
    (3, S, S), label int); `plan` holds `plan_fields(levels)` (`levels` may be left out for two). An
    incomplete `out` made with the same plan is continued after its last record; a complete one is
    left as it is.

    `processes` (accelerate's PartialState or an Accelerator; default: this process's state) says
    which process this is: batch k of the images still to encode goes to process k mod N, and each
    round the N batches are gathered to process 0, which writes them in dataset order.
    """
    _check_loader_arguments(batch_size, workers)
    plan = _normalised_plan(plan, out)
    job = _job(plan)
    total = len(dataset)
    processes = processes or PartialState(cpu=resolve_device() == "cpu")
    writer = CodeWriter(out, map_size) if processes.is_main_process else None
    with writer or nullcontext():
        start = _shared_resume_point(writer, job, total, processes)
        if start is None:
            processes.print(f"{out} is complete already ({total} records from the same job): nothing to encode", flush=True)
            return total
        if start > 0:
            processes.print(f"{out}: resuming after {start} of {total} records", flush=True)
        started = time.perf_counter()
        rounds = _encoded_rounds(encode, dataset, range(start, total), batch_size, workers, plan, processes)
        bar = tqdm(total=total, initial=start, unit="img", desc="extracting codes",
                   disable=not (progress and processes.is_main_process))
        with bar:
            index = start
            for rows in rounds:
                if writer is not None:
                    index = _write_rows(writer, rows, index, bar)
        seconds = time.perf_counter() - started
        if writer is not None:
            writer.put_many([(META_KEY, json_bytes({**job, "count": total}))])
        processes.print(f"encoded {total - start} images in {seconds:.3f} s ({(total - start) / seconds:.1f} images/s)",
                        flush=True)
    return total


def _encoded_rounds(encode, dataset: Dataset, indices: range, batch_size: int, workers: int, plan: dict, processes):
    """Yields, round by round, the record rows (R, record_size) uint8 of the images `indices`, in
    order: in each round process p encodes batch p of the round, and every process receives all."""
    first_indices = indices[::batch_size]  # of the batches
    mine = first_indices[processes.process_index :: processes.num_processes]
    my_indices = [i for first in mine for i in range(first, min(first + batch_size, indices.stop))]
    batches = iter(DataLoader(Subset(dataset, my_indices), batch_size=batch_size, num_workers=workers))
    empty = np.zeros((0, record_size(plan)), np.uint8)
    for _ in range(math.ceil(len(first_indices) / processes.num_processes)):
        batch = next(batches, None)  # None: this process has no batch in the last round
        rows = empty if batch is None else encode_records(batch[1], [codes.cpu() for codes in encode(batch[0])], plan)
        yield _gather_rows(rows, batch_size, processes)


def _shared_resume_point(writer: CodeWriter | None, job: dict, total: int, processes) -> int | None:
    """`_resume_point` as process 0 (the one with the writer) finds it, told to every process."""
    start = _resume_point(writer, job, total) if writer is not None else 0
    if processes.num_processes > 1:
        mine = torch.tensor([-1 if start is None else start], device=processes.device)
        start = int(broadcast(mine, from_process=0)[0])
        start = None if start < 0 else start
    return start


def _gather_rows(rows: np.ndarray, batch_size: int, processes) -> np.ndarray:
    """Every process's record rows of this round, (R, record_size) uint8, in process order.

    Each process sends `batch_size` rows, padded, behind a column that marks the real ones."""
    if processes.num_processes == 1:
        return rows
    padded = torch.zeros(batch_size, 1 + rows.shape[1], dtype=torch.uint8)  # (B, 1 + record_size)
    padded[: len(rows), 0] = 1
    padded[: len(rows), 1:] = torch.from_numpy(rows)
    every = gather(padded.to(processes.device)).cpu()  # (N * B, 1 + record_size)
    return every[every[:, 0] == 1, 1:].numpy()


def write_codes(out, plan: dict, batches, map_size: int = DEFAULT_MAP_SIZE) -> int:
    """Writes a complete code database from codes at hand, without a VQ-VAE (tests, benchmarks); -> the count.

    `batches` yields (labels (B,), then one integer code grid per level, top first: top_codes
    (B, Ht, Wt), bottom_codes (B, Hb, Wb) for two levels); `plan` holds `plan_fields(levels)`. `out`
    must not exist: there is no job to resume.
    """
    plan = _normalised_plan(plan, out)
    if Path(out).exists():
        raise CodeStoreError(f"{out} exists already: write_codes makes a new database")
    job = _job(plan)
    with CodeWriter(out, map_size) as writer:
        writer.put_many([(PLAN_KEY, json_bytes(job))])
        count = 0
        for labels, *codes in batches:
            count = _write_rows(writer, encode_records(labels.cpu(), [c.cpu() for c in codes], plan), count)
        writer.put_many([(META_KEY, json_bytes({**job, "count": count}))])
    return count


def _write_rows(writer: CodeWriter, rows: np.ndarray, start: int, bar=None) -> int:
    """Writes rows of record bytes as records start, start+1, ... in one transaction; -> the
    index after the last."""
    writer.put_many([(record_key(start + i), row.tobytes()) for i, row in enumerate(rows)])
    if bar is not None:
        bar.update(len(rows))
    return start + len(rows)


def _check_loader_arguments(batch_size: int, workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")


def _normalised_plan(plan: dict, out) -> dict:
    """The plan as it reads back from JSON (tuples become lists), after checking its fields; without
    `levels` for two levels, as two-level databases have always been written."""
    if plan.get("levels") == TWO_LEVELS:
        plan = {name: value for name, value in plan.items() if name != "levels"}
    check_layout(plan, f"plan for {out}")
    expected = plan_fields(layout_levels(plan))
    extra = sorted(set(plan) - set(expected))
    if extra:
        raise CodeStoreError(f"plan for {out} has unknown fields {', '.join(extra)}: expected {', '.join(expected)}")
    return json.loads(json_bytes(plan))


def _job(plan: dict) -> dict:
    """What `__plan__` holds: the format and its version, then the plan."""
    return {"format": FORMAT, "format_version": format_version(plan), **plan}


def _resume_point(writer: CodeWriter, job: dict, total: int) -> int | None:
    """The index of the first record still to write, or None when the database is complete."""
    metadata = writer.get_json(META_KEY)
    if metadata is not None:
        _check_same_job(writer.path, metadata, {**job, "count": total})
        return None
    stored_job = writer.get_json(PLAN_KEY)
    if stored_job is None:
        if writer.entries() > 0:
            raise CodeStoreError(f"{writer.path} is an LMDB database but not a code database (no __plan__ record)")
        writer.put_many([(PLAN_KEY, json_bytes(job))])
        return 0
    _check_same_job(writer.path, stored_job, job)
    done = writer.count_records()
    if done > total:
        raise CodeStoreError(f"{writer.path} holds {done} records but the dataset has only {total}")
    return done


def _check_same_job(path, stored: dict, wanted: dict) -> None:
    source = wanted.get("source")
    if isinstance(source, dict) and "fingerprint" not in stored.get("source", {}):
        # a database begun before sources carried a fingerprint: compared on what it stored
        wanted = {**wanted, "source": {k: v for k, v in source.items() if k != "fingerprint"}}
    differences = [
        f"{name} {stored.get(name)!r} there, {wanted.get(name)!r} now"
        for name in sorted(set(stored) | set(wanted))
        if stored.get(name) != wanted.get(name)
    ]
    if differences:
        raise CodeStoreError(f"{path} was made by a different job: {'; '.join(differences)}")


def data_source(spec, split, dataset):
    """What a code database was extracted from: the data (absolute), the split, the image count and,
    where the data is files, their fingerprint (names, sizes, times): a resumed extraction on other
    files of the same count is then refused."""
    source = {"data": spec, "split": split, "images": len(dataset)}
    if getattr(dataset, "fingerprint", None) is not None:
        source["fingerprint"] = dataset.fingerprint
    return source


def extract_with_vqvae(vqvae_path, data, out, split="train", size=None, n_classes=None, batch_size=64, workers=0,
                       device=None, precision="fp32"):
    """Encodes a dataset split with a VQ-VAE checkpoint into the database `out` (resumably).

    size defaults to the image size the VQ-VAE was trained on; n_classes to the split's largest
    label + 1 (give the train split's value when extracting test). device and precision as
    pipelines.device takes them; fp32 by default, as bf16 changes about 2% of the codes of a
    trained VQ-VAE (bench/results/extract.md). Under `accelerate launch` the processes share the work.
    Returns the record count.
    """
    _check_loader_arguments(batch_size, workers)
    if n_classes is not None and n_classes < 0:
        raise ValueError(f"--n-classes must be >= 0, got {n_classes}")
    runtime = make_runtime(device, precision)
    model, extra = load_vqvae(vqvae_path)
    image_size = extra.get("image_size") if size is None else size
    if image_size is None:
        raise ValueError(f"{vqvae_path} does not record the image size it was trained on: pass --size")
    shapes = model.code_shapes(image_size)  # refuses sizes that are not multiples of the top stride
    dataset = load_dataset(data, split, image_size)
    source = absolute_spec(data)
    labels_seen = count_classes(dataset)
    if n_classes is not None and n_classes > 0 and labels_seen > n_classes:
        raise ValueError(f"the {split} split of {data} has labels up to {labels_seen - 1}: --n-classes {n_classes} is too few")
    names = model.config.level_names
    plan = dict(
        levels=len(names),
        **{f"{name}_shape": list(shape) for name, shape in zip(names, shapes)},
        **{f"{name}_codes": size for name, size in zip(names, model.config.codebook_sizes())},
        n_classes=labels_seen if n_classes is None else n_classes,
        vqvae_sha256=file_sha256(resolve_checkpoint(vqvae_path)), image_size=image_size,
        source=data_source(source, split, dataset),
    )
    model = runtime.vqvae(model)
    runtime.processes.print(f"{runtime.processes.num_processes} process(es) on {runtime.device.type}, "
                            f"precision {runtime.precision}", flush=True)

    @torch.no_grad()
    def encode(images_uint8):
        with runtime.autocast():
            return model.encode(runtime.images(images_uint8))

    return extract_codes(encode, dataset, out, plan, batch_size, workers, processes=runtime.processes)
