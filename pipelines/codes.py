"""The code database: a dataset encoded by a VQ-VAE-2, one LMDB record per image. No pickle.

A database is an LMDB directory (`subdir=True`) holding:

- records under 8-byte big-endian keys 0, 1, 2, ...: label as int32, then the top codes as uint16
  (Ht*Wt), then the bottom codes as uint16 (Hb*Wb), all little-endian: 4 + 2*(Ht*Wt + Hb*Wb) bytes;
- `__plan__`, written first: the job (VQ-VAE hash, grid shapes, codebook sizes, data) as JSON, so a
  resumed extraction can check that it continues the same job;
- `__meta__`, written last: the plan plus `count`. Its presence marks the database complete.

Example: 32x32 images with 4x4 top and 8x8 bottom grids give 4 + 2*(16 + 64) = 164-byte records.
Records are written one transaction per round of batches (one batch per process), so a kill or a
full disk leaves whole rounds, and running the extraction again continues after them. Under
several processes (`accelerate launch`) each encodes its share of the batches and process 0, the
only writer, writes them in dataset order: the database is the one a single process writes.
Every problem with a database raises CodeStoreError with a one-line message naming the path (and
the record, for a damaged one).
"""

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast, gather
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pipelines.checkpoint import CheckpointError, load_vqvae, resolve_checkpoint
from pipelines.data import load_dataset
from pipelines.inference import make_runtime, resolve_device

FORMAT = "pixelsnail-codes"
FORMAT_VERSION = 1
META_KEY = b"__meta__"
PLAN_KEY = b"__plan__"
PLAN_FIELDS = (
    "top_shape", "bottom_shape", "top_codes", "bottom_codes", "n_classes", "vqvae_sha256",
    "image_size", "source",
)
MAX_CODES = 2**16  # codes are stored as uint16
DEFAULT_MAP_SIZE = 2**30  # address space only: on Linux the file grows with the data


class CodeStoreError(ValueError):
    """A code database that is missing, incomplete, foreign, damaged, or from another job."""


def record_key(index: int) -> bytes:
    """Fixed-width big-endian keys sort like their integers, so records lie in index order."""
    return index.to_bytes(8, "big")


def file_sha256(path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def count_classes(dataset: Dataset) -> int:
    """Largest label + 1 over the dataset, read without loading images; 0 when it lists no labels.

    The datasets of pipelines.data keep their labels in `.labels`, under Subset and ConcatDataset.
    """
    labels = dataset_labels(dataset)
    return int(labels.max()) + 1 if labels is not None and len(labels) else 0


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """The labels (N,) of a dataset of pipelines.data, read without loading images; None if it lists none."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[list(dataset.indices)]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else torch.cat(parts)
    labels = getattr(dataset, "labels", None)
    return None if labels is None else torch.as_tensor(labels)


# ------------------------------------------------------------------------------------------------
# Records


def record_size(layout: dict) -> int:
    (top_h, top_w), (bottom_h, bottom_w) = layout["top_shape"], layout["bottom_shape"]
    return 4 + 2 * (top_h * top_w + bottom_h * bottom_w)


def encode_records(labels: Tensor, top_codes: Tensor, bottom_codes: Tensor, layout: dict) -> np.ndarray:
    """A batch as rows of record bytes, (B, record_size) uint8, after checking it fits `layout`."""
    batch = len(labels)
    _check_codes("top", top_codes, (batch, *layout["top_shape"]), layout["top_codes"])
    _check_codes("bottom", bottom_codes, (batch, *layout["bottom_shape"]), layout["bottom_codes"])
    n_classes = layout["n_classes"]
    if n_classes > 0 and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels {int(labels.min())}..{int(labels.max())} lie outside [0, {n_classes}) (n_classes)")
    fields = [
        labels.numpy().astype("<i4"),
        top_codes.reshape(batch, -1).numpy().astype("<u2"),
        bottom_codes.reshape(batch, -1).numpy().astype("<u2"),
    ]
    return np.concatenate([field.reshape(batch, -1).view(np.uint8) for field in fields], axis=1)


def _check_codes(level: str, codes: Tensor, shape: tuple, n_codes: int) -> None:
    if tuple(codes.shape) != shape or codes.dtype.is_floating_point:
        raise ValueError(f"encode gave {level} codes {codes.dtype} {tuple(codes.shape)}, expected integers {shape}")
    if codes.min() < 0 or codes.max() >= n_codes:
        raise ValueError(f"encode gave {level} codes {int(codes.min())}..{int(codes.max())}, outside [0, {n_codes})")


def decode_record(value: bytes, layout: dict, where: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Record bytes -> (label, top (Ht, Wt) uint16, bottom (Hb, Wb) uint16), checked against `layout`."""
    if len(value) != record_size(layout):
        raise CodeStoreError(f"{where} holds {len(value)} bytes, expected {record_size(layout)}: damaged record")
    top_shape, bottom_shape = layout["top_shape"], layout["bottom_shape"]
    n_top = top_shape[0] * top_shape[1]
    label = int(np.frombuffer(value, "<i4", count=1)[0])
    top = np.frombuffer(value, "<u2", count=n_top, offset=4).reshape(top_shape)
    bottom = np.frombuffer(value, "<u2", offset=4 + 2 * n_top).reshape(bottom_shape)
    for level, codes in (("top", top), ("bottom", bottom)):
        if codes.max() >= layout[f"{level}_codes"]:
            raise CodeStoreError(
                f"{where} has {level} code {codes.max()} >= codebook size {layout[f'{level}_codes']}: damaged record"
            )
    n_classes = layout["n_classes"]
    if n_classes > 0 and not 0 <= label < n_classes:
        raise CodeStoreError(f"{where} has label {label} outside [0, {n_classes}): damaged record")
    return label, top, bottom


def _record_name(path, index: int) -> str:
    return f"{path} record {index} (key {record_key(index).hex()})"


# ------------------------------------------------------------------------------------------------
# Metadata


def _check_layout(fields: dict, where: str) -> None:
    """Checks the fields that the record format depends on."""
    missing = [name for name in PLAN_FIELDS if name not in fields]
    if missing:
        raise CodeStoreError(f"{where} lacks {', '.join(missing)}")
    for name in ("top_shape", "bottom_shape"):
        shape = fields[name]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(n, 1) for n in shape)):
            raise CodeStoreError(f"{where} has {name} {shape!r}: expected two positive integers")
    for name in ("top_codes", "bottom_codes"):
        if not (_is_int(fields[name], 1) and fields[name] <= MAX_CODES):
            raise CodeStoreError(f"{where} has {name} {fields[name]!r}: expected an integer in 1..{MAX_CODES}")
    if not _is_int(fields["n_classes"], 0):
        raise CodeStoreError(f"{where} has n_classes {fields['n_classes']!r}: expected an integer >= 0")


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_metadata(metadata: dict, path) -> None:
    if metadata.get("format") != FORMAT:
        raise CodeStoreError(
            f"{path} is not a code database: its __meta__ has format {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    version = metadata.get("format_version")
    if not _is_int(version, 1):
        raise CodeStoreError(f"{path} has format_version {version!r}: expected a positive integer")
    if version > FORMAT_VERSION:
        raise CodeStoreError(
            f"{path} has format_version {version}, newer than this code reads ({FORMAT_VERSION}): update the code"
        )
    _check_layout(metadata, f"{path} metadata")
    if not _is_int(metadata.get("count"), 0):
        raise CodeStoreError(f"{path} metadata has count {metadata.get('count')!r}: expected an integer >= 0")


def _load_json(value: bytes | None, path, key: bytes) -> dict | None:
    if value is None:
        return None
    try:
        fields = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        fields = None
    if not isinstance(fields, dict):
        raise CodeStoreError(f"{path} is not a code database: its {key.decode()} record is not a JSON object")
    return fields


def _json_bytes(fields: dict) -> bytes:
    return json.dumps(fields).encode("utf-8")


# ------------------------------------------------------------------------------------------------
# What a prior was trained on

LEVELS = ("top", "bottom")


@dataclass(frozen=True)
class PriorProvenance:
    """What a prior was trained on: its level and the code database's VQ-VAE (file hash), image size,
    grids, codebooks and classes. The prior trainer writes it into the checkpoint's metadata
    (`to_extra`); generation reads it back (`from_extra`) and checks it against its VQ-VAE."""

    level: str
    vqvae_sha256: str
    image_size: int
    top_shape: tuple[int, int]
    bottom_shape: tuple[int, int]
    top_codes: int
    bottom_codes: int
    n_classes: int

    @classmethod
    def of_database(cls, metadata: dict, level: str) -> "PriorProvenance":
        fields = {name: metadata[name] for name in PROVENANCE_FIELDS}
        fields.update(top_shape=tuple(fields["top_shape"]), bottom_shape=tuple(fields["bottom_shape"]))
        return cls(level=level, **fields)

    def to_extra(self) -> dict:
        """As a checkpoint's extra metadata: {"level": ..., "codes": {the database's fields}}."""
        return {"level": self.level, "codes": {name: getattr(self, name) for name in PROVENANCE_FIELDS}}

    @classmethod
    def from_extra(cls, extra: dict, path) -> "PriorProvenance":
        """From a checkpoint's extra metadata; CheckpointError naming `path` if it holds none."""
        codes = extra.get("codes")
        if extra.get("level") not in LEVELS or not isinstance(codes, dict):
            raise CheckpointError(f"{path} does not record the code database it was trained on")
        try:
            return cls.of_database(codes, extra["level"])
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{path} has a damaged record of its code database ({error!r})") from None


PROVENANCE_FIELDS = tuple(name for name in PriorProvenance.__dataclass_fields__ if name != "level")


def prior_fields(record: PriorProvenance) -> dict:
    """The PixelSNAILConfig fields that a code database (or a VQ-VAE, described by the same record)
    fixes for a prior of the record's level: grid, codebook, conditions."""
    level = record.level
    fields = {
        "shape": getattr(record, f"{level}_shape"),
        "n_codes": getattr(record, f"{level}_codes"),
        "n_classes": record.n_classes if record.n_classes > 1 else 0,  # one class: no condition
        "cond_codes": None,
        "cond_shape": None,
    }
    if level == "bottom":
        fields.update(cond_codes=record.top_codes, cond_shape=record.top_shape)
    return fields


def check_fits(config, record: PriorProvenance, what: str) -> None:
    """Raises ValueError, naming both values, where a prior's config does not fit `what` (a code
    database or a VQ-VAE, described by `record`)."""
    for name, expected in prior_fields(record).items():
        actual = getattr(config, name)
        if actual != expected:
            raise ValueError(f"the {record.level} prior has {name}={actual} but {what} has {expected}")


# ------------------------------------------------------------------------------------------------
# Reading

# One read-only environment per database per process: lmdb refuses to open the same files twice in
# one process, so datasets on the same path share it. A child forked while the parent had it open
# inherits the parent's handle, which it must not use and which blocks a new open: it is closed
# there (that only unmaps the child's copy) and reopened.
_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


def _open_readonly(path) -> lmdb.Environment:
    path = Path(path)
    if not path.exists():
        raise CodeStoreError(f"code database not found: {path}")
    if not (path / "data.mdb").is_file():
        raise CodeStoreError(f"{path} is not an LMDB database: expected a directory holding data.mdb")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as error:
        raise CodeStoreError(f"{path} is not a readable LMDB database ({error})") from None
    _check_not_truncated(env, path)
    return env


def _check_not_truncated(env: lmdb.Environment, path) -> None:
    """Refuses (closing `env`) a data.mdb shorter than the pages its last commit uses (a file cut
    short by a copy or a full disk): LMDB reads pages through mmap, so touching a missing one kills
    the process with SIGBUS instead of raising."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (Path(path) / "data.mdb").stat().st_size
    if size < needed:
        env.close()
        raise CodeStoreError(f"{path} is truncated: data.mdb holds {size} bytes but its last commit uses {needed}")


@contextmanager
def _lmdb_read_errors(where: str):
    """lmdb's own exceptions (neither ValueError nor OSError) as a one-line CodeStoreError."""
    try:
        yield
    except lmdb.Error as error:
        raise CodeStoreError(f"{where} is damaged: LMDB says {error}") from None


def _shared_reader(path: str) -> lmdb.Environment:
    pid, env = _READERS.get(path, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()
        env = _open_readonly(path)
        _READERS[path] = (os.getpid(), env)
    return env


@contextmanager
def _reading(path):
    """A read-only environment: this process's shared one if it has one, else one closed afterwards."""
    shared_key = os.path.realpath(path)
    if shared_key in _READERS:
        yield _shared_reader(shared_key)
    else:
        with _open_readonly(path) as env:
            yield env


def read_metadata(path) -> dict:
    """The metadata of a complete code database, checked (format, version, fields, record count)."""
    with _reading(path) as env, _lmdb_read_errors(path), env.begin() as txn:
        metadata = _load_json(txn.get(META_KEY), path, META_KEY)
        if metadata is None:
            if txn.get(PLAN_KEY) is None:
                raise CodeStoreError(f"{path} is not a code database: it has no __meta__ record")
            raise CodeStoreError(f"{path} is incomplete: extraction did not finish; re-run extract_codes.py to resume")
        _check_metadata(metadata, path)
        entries = txn.stat()["entries"]
    if entries != metadata["count"] + 2:
        raise CodeStoreError(f"{path} holds {entries - 2} records but its metadata says {metadata['count']}")
    return metadata


class CodeDataset(Dataset):
    """A complete code database as a Dataset of (top (Ht, Wt) int64, bottom (Hb, Wb) int64, label int64 scalar).

    Holds no lmdb handle, only the path and the metadata, so it pickles into DataLoader workers
    (fork or spawn); each process opens the database read-only on its first item.
    """

    def __init__(self, path):
        self.path = os.path.realpath(path)
        self.metadata = read_metadata(path)

    def __len__(self) -> int:
        return self.metadata["count"]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        where = _record_name(self.path, index)
        with _lmdb_read_errors(where), _shared_reader(self.path).begin() as txn:
            value = txn.get(record_key(index))
        if value is None:
            raise CodeStoreError(f"{where} is missing")
        label, top, bottom = decode_record(value, self.metadata, where)
        return torch.from_numpy(top.astype(np.int64)), torch.from_numpy(bottom.astype(np.int64)), torch.tensor(label)


# ------------------------------------------------------------------------------------------------
# Writing


class CodeWriter:
    """A code database open for writing: batches of records per transaction, map grown when full.

    Records go in with `overwrite=False` and the return value of put is checked, so a key written
    twice stops extraction. (`append=True` cannot be used: `__plan__` sorts after every record key,
    so appending a record would always be refused.)
    """

    def __init__(self, path, map_size: int = DEFAULT_MAP_SIZE):
        self.path = Path(path)
        if self.path.exists() and not (self.path / "data.mdb").is_file():
            raise CodeStoreError(f"{self.path} exists and is not an LMDB database: choose a new path")
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, subdir=True)
        except lmdb.Error as error:
            raise CodeStoreError(f"cannot open {self.path} for writing ({error})") from None
        _check_not_truncated(self.env, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        self.env.close()  # every commit was synced already (lmdb.open's sync=True)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Writes all items in one transaction, so a kill, or a full disk, leaves all of them or none."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in items:
                        if not txn.put(key, value, overwrite=False):
                            raise CodeStoreError(f"{self.path} holds key {key.hex()} already: refusing to write it twice")
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(2 * self.env.info()["map_size"])
            except lmdb.Error as error:
                raise self._write_failed(error) from None

    def _write_failed(self, error: lmdb.Error) -> CodeStoreError:
        """A failed commit as one line. A full disk raises lmdb.DiskError (ENOSPC), or lmdb.Error
        'Input/output error' when a page was written in part (LMDB counts a short write as EIO).
        LMDB writes its meta page (the new root) only after the data pages, so what was committed before stays."""
        try:
            kept = f"the {self.count_records()} records committed before are kept"
        except (lmdb.Error, CodeStoreError):
            kept = "what was committed before is kept"
        if isinstance(error, lmdb.DiskError):
            return CodeStoreError(f"disk full while writing {self.path} ({error}): {kept}; "
                                  "free space and run the same command again to resume")
        return CodeStoreError(f"writing {self.path} failed ({error}; is the disk full?): {kept}; "
                              "fix that and run the same command again to resume")

    def get_json(self, key: bytes):
        with self.env.begin() as txn:
            return _load_json(txn.get(key), self.path, key)

    def entries(self) -> int:
        with self.env.begin() as txn:
            return txn.stat()["entries"]

    def count_records(self) -> int:
        """The number of records, after checking they are exactly keys 0..k-1."""
        count = 0
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(values=False):
                if key in (META_KEY, PLAN_KEY):
                    continue
                if key != record_key(count):
                    raise CodeStoreError(f"{self.path} has key {key.hex()} where record {count} should be")
                count += 1
        return count


def extract_codes(
    encode, dataset: Dataset, out, plan: dict, batch_size: int = 64, workers: int = 0,
    progress: bool = True, map_size: int = DEFAULT_MAP_SIZE, processes: PartialState | None = None,
) -> int:
    """Encodes `dataset` into the code database `out`, resuming a run that was stopped; -> the count.

    `encode(images)` maps uint8 images (B, 3, S, S) to (top_codes (B, Ht, Wt), bottom_codes (B, Hb, Wb));
    `dataset` yields (image uint8 (3, S, S), label int); `plan` holds PLAN_FIELDS. An incomplete `out`
    made with the same plan is continued after its last record; a complete one is left as it is.

    `processes` (accelerate's PartialState or an Accelerator; default: this process's state) says
    which process this is: batch k of the images still to encode goes to process k mod N, and each
    round the N batches are gathered to process 0, which writes them in dataset order.
    """
    _check_loader_arguments(batch_size, workers)
    plan = _normalised_plan(plan, out)
    job = {"format": FORMAT, "format_version": FORMAT_VERSION, **plan}
    total = len(dataset)
    processes = processes or PartialState(cpu=resolve_device() == "cpu")
    writer = CodeWriter(out, map_size) if processes.is_main_process else None
    with writer or nullcontext():
        start = _shared_resume_point(writer, job, total, processes)
        if start is None:
            processes.print(f"{out} is complete already ({total} records from the same job): nothing to do", flush=True)
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
            writer.put_many([(META_KEY, _json_bytes({**job, "count": total}))])
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
        rows = empty if batch is None else encode_records(batch[1], *(codes.cpu() for codes in encode(batch[0])), plan)
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

    `batches` yields (labels (B,), top_codes (B, Ht, Wt), bottom_codes (B, Hb, Wb)) integer tensors;
    `plan` holds PLAN_FIELDS. `out` must not exist: there is no job to resume.
    """
    plan = _normalised_plan(plan, out)
    if Path(out).exists():
        raise CodeStoreError(f"{out} exists already: write_codes makes a new database")
    job = {"format": FORMAT, "format_version": FORMAT_VERSION, **plan}
    with CodeWriter(out, map_size) as writer:
        writer.put_many([(PLAN_KEY, _json_bytes(job))])
        count = 0
        for labels, top_codes, bottom_codes in batches:
            count = _write_rows(writer, encode_records(labels.cpu(), top_codes.cpu(), bottom_codes.cpu(), plan), count)
        writer.put_many([(META_KEY, _json_bytes({**job, "count": count}))])
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
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")


def _normalised_plan(plan: dict, out) -> dict:
    """The plan as it reads back from JSON (tuples become lists), after checking its fields."""
    extra = sorted(set(plan) - set(PLAN_FIELDS))
    if extra:
        raise CodeStoreError(f"plan for {out} has unknown fields {', '.join(extra)}: expected {', '.join(PLAN_FIELDS)}")
    _check_layout(plan, f"plan for {out}")
    return json.loads(_json_bytes(plan))


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
        writer.put_many([(PLAN_KEY, _json_bytes(job))])
        return 0
    _check_same_job(writer.path, stored_job, job)
    done = writer.count_records()
    if done > total:
        raise CodeStoreError(f"{writer.path} holds {done} records but the dataset has only {total}")
    return done


def _check_same_job(path, stored: dict, wanted: dict) -> None:
    differences = [
        f"{name} {stored.get(name)!r} there, {wanted.get(name)!r} now"
        for name in sorted(set(stored) | set(wanted))
        if stored.get(name) != wanted.get(name)
    ]
    if differences:
        raise CodeStoreError(f"{path} was made by a different job: {'; '.join(differences)}")


def extract_with_vqvae(vqvae_path, data, out, split="train", size=None, n_classes=None, batch_size=64, workers=0,
                       device=None, precision="fp32"):
    """Encodes a dataset split with a VQ-VAE checkpoint into the database `out` (resumably).

    size defaults to the image size the VQ-VAE was trained on; n_classes to the split's largest
    label + 1 (give the train split's value when extracting test). device and precision as
    pipelines.inference takes them; fp32 by default, as bf16 changes about 2% of the codes of a
    trained VQ-VAE (bench/results/extract.md). Under `accelerate launch` the processes share the work.
    Returns the record count.
    """
    _check_loader_arguments(batch_size, workers)
    if n_classes is not None and n_classes < 0:
        raise ValueError(f"n_classes must be >= 0, got {n_classes}")
    runtime = make_runtime(device, precision)
    model, extra = load_vqvae(vqvae_path)
    image_size = extra.get("image_size") if size is None else size
    if image_size is None:
        raise ValueError(f"{vqvae_path} does not record the image size it was trained on: pass --size")
    top_shape, bottom_shape = model.code_shapes(image_size)  # refuses sizes that are not multiples of 8
    dataset = load_dataset(data, split, image_size)
    source = data if data == "builtin" else str(Path(data).expanduser().resolve())
    labels_seen = count_classes(dataset)
    if n_classes is not None and n_classes > 0 and labels_seen > n_classes:
        raise ValueError(f"the {split} split of {data} has labels up to {labels_seen - 1}: --n-classes {n_classes} is too few")
    plan = dict(
        top_shape=list(top_shape), bottom_shape=list(bottom_shape),
        top_codes=model.config.top_codes, bottom_codes=model.config.bottom_codes,
        n_classes=labels_seen if n_classes is None else n_classes,
        vqvae_sha256=file_sha256(resolve_checkpoint(vqvae_path)), image_size=image_size,
        source={"data": source, "split": split, "images": len(dataset)},
    )
    model = runtime.vqvae(model)
    runtime.processes.print(f"{runtime.processes.num_processes} process(es) on {runtime.device.type}, "
                            f"precision {runtime.precision}", flush=True)

    @torch.no_grad()
    def encode(images_uint8):
        with runtime.autocast():
            return model.encode(runtime.images(images_uint8))

    return extract_codes(encode, dataset, out, plan, batch_size, workers, processes=runtime.processes)
