"""The code database: a dataset encoded by a VQ-VAE-2, one LMDB record per image. No pickle.

A database is an LMDB directory (`subdir=True`) holding:

- records under 8-byte big-endian keys 0, 1, 2, ...: label as int32, then the codes of every level,
  top first, as uint16 (H*W each), all little-endian: with two levels 4 + 2*(Ht*Wt + Hb*Wb) bytes;
- `__plan__`, written first: the job (VQ-VAE hash, levels, grid shapes, codebook sizes, data) as
  JSON, so a resumed extraction can check that it continues the same job;
- `__meta__`, written last: the plan plus `count`. Its presence marks the database complete.

Each level has a `<name>_shape` and a `<name>_codes` (codebook size) field, its name from
modelkit.level_names: `top_*` and `bottom_*` for two levels, `top_*`, `middle_*` and `bottom_*` for
three. A two-level database is format version 1, as every database was before the number of levels
became a parameter: it has no `levels` field, and the same bytes as then. Any other number of
levels is format version 2, whose `levels` field says how many (a reader of version 1 only refuses
it as newer, rather than misreading its records).

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
import os
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from modelkit import level_names

FORMAT = "pixelsnail-codes"
FORMAT_VERSION = 2  # the newest this code reads and writes (version 1: two levels)
TWO_LEVELS = 2  # what a database without a `levels` field holds
META_KEY = b"__meta__"
PLAN_KEY = b"__plan__"
JOB_FIELDS = ("n_classes", "vqvae_sha256", "image_size", "source")  # besides the levels' fields
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


# ------------------------------------------------------------------------------------------------
# Records


def layout_levels(layout: dict) -> int:
    """How many levels of codes a plan or metadata describes."""
    return layout.get("levels", TWO_LEVELS)


def level_grids(layout: dict) -> list[tuple[str, tuple[int, int], int]]:
    """(name, grid shape (H, W), codebook size) of every level of a layout, top first."""
    return [(name, tuple(layout[f"{name}_shape"]), layout[f"{name}_codes"])
            for name in level_names(layout_levels(layout))]


def plan_fields(levels: int) -> tuple[str, ...]:
    """The fields of a plan for `levels` levels: `levels` (left out for two), each level's shape
    and codebook size, then the job's."""
    names = level_names(levels)
    counted = () if levels == TWO_LEVELS else ("levels",)
    return (*counted, *[f"{name}_shape" for name in names], *[f"{name}_codes" for name in names], *JOB_FIELDS)


def format_version(layout: dict) -> int:
    """The version of the format a database of this layout is written in: 1 for two levels."""
    return 1 if layout_levels(layout) == TWO_LEVELS else FORMAT_VERSION


def record_size(layout: dict) -> int:
    return 4 + 2 * sum(h * w for _, (h, w), _ in level_grids(layout))


def encode_records(labels: Tensor, codes, layout: dict) -> np.ndarray:
    """A batch as rows of record bytes, (B, record_size) uint8, after checking it fits `layout`.

    codes: one integer grid per level, top first, (B, H, W) each (what VQVAE2.encode returns)."""
    batch, grids = len(labels), level_grids(layout)
    if len(codes) != len(grids):
        names = ", ".join(name for name, _, _ in grids)
        raise ValueError(f"encode gave {len(codes)} code grids, expected {len(grids)} ({names})")
    for level_codes, (name, shape, n_codes) in zip(codes, grids):
        _check_codes(name, level_codes, (batch, *shape), n_codes)
    n_classes = layout["n_classes"]
    if n_classes > 0 and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels {int(labels.min())}..{int(labels.max())} lie outside [0, {n_classes}) (n_classes)")
    fields = [labels.numpy().astype("<i4"), *[c.reshape(batch, -1).numpy().astype("<u2") for c in codes]]
    return np.concatenate([field.reshape(batch, -1).view(np.uint8) for field in fields], axis=1)


def _check_codes(level: str, codes: Tensor, shape: tuple, n_codes: int) -> None:
    if tuple(codes.shape) != shape or codes.dtype.is_floating_point:
        raise ValueError(f"encode gave {level} codes {codes.dtype} {tuple(codes.shape)}, expected integers {shape}")
    if codes.min() < 0 or codes.max() >= n_codes:
        raise ValueError(f"encode gave {level} codes {int(codes.min())}..{int(codes.max())}, outside [0, {n_codes})")


def decode_record(value: bytes, layout: dict, where: str) -> tuple:
    """Record bytes -> (label, then one uint16 grid (H, W) per level, top first), checked against
    `layout`: (label, top (Ht, Wt), bottom (Hb, Wb)) for two levels."""
    if len(value) != record_size(layout):
        raise CodeStoreError(f"{where} holds {len(value)} bytes, expected {record_size(layout)}: damaged record")
    label = int(np.frombuffer(value, "<i4", count=1)[0])
    grids, offset = [], 4
    for name, (h, w), n_codes in level_grids(layout):
        codes = np.frombuffer(value, "<u2", count=h * w, offset=offset).reshape(h, w)
        if codes.max() >= n_codes:
            raise CodeStoreError(f"{where} has {name} code {codes.max()} >= codebook size {n_codes}: damaged record")
        grids.append(codes)
        offset += 2 * h * w
    n_classes = layout["n_classes"]
    if n_classes > 0 and not 0 <= label < n_classes:
        raise CodeStoreError(f"{where} has label {label} outside [0, {n_classes}): damaged record")
    return label, *grids


def _record_name(path, index: int) -> str:
    return f"{path} record {index} (key {record_key(index).hex()})"


# ------------------------------------------------------------------------------------------------
# Metadata


def check_layout(fields: dict, where: str) -> None:
    """Checks the fields that the record format depends on."""
    levels = layout_levels(fields)
    if not _is_int(levels, TWO_LEVELS):
        raise CodeStoreError(f"{where} has levels {levels!r}: expected an integer >= {TWO_LEVELS}")
    missing = [name for name in plan_fields(levels) if name not in fields]
    if missing:
        raise CodeStoreError(f"{where} lacks {', '.join(missing)}")
    for name in level_names(levels):
        shape, n_codes = fields[f"{name}_shape"], fields[f"{name}_codes"]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(n, 1) for n in shape)):
            raise CodeStoreError(f"{where} has {name}_shape {shape!r}: expected two positive integers")
        if not (_is_int(n_codes, 1) and n_codes <= MAX_CODES):
            raise CodeStoreError(f"{where} has {name}_codes {n_codes!r}: expected an integer in 1..{MAX_CODES}")
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
    check_layout(metadata, f"{path} metadata")
    if version < format_version(metadata):
        raise CodeStoreError(f"{path} has {layout_levels(metadata)} levels but format_version {version}, which "
                             f"holds two: damaged metadata")
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


def json_bytes(fields: dict) -> bytes:
    return json.dumps(fields).encode("utf-8")


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
    """A complete code database as a Dataset of (one int64 grid (H, W) per level, top first, then the
    label, an int64 scalar): (top (Ht, Wt), bottom (Hb, Wb), label) for two levels.

    Holds no lmdb handle, only the path and the metadata, so it pickles into DataLoader workers
    (fork or spawn); each process opens the database read-only on its first item.
    """

    def __init__(self, path):
        self.path = os.path.realpath(path)
        self.metadata = read_metadata(path)

    def __len__(self) -> int:
        return self.metadata["count"]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        where = _record_name(self.path, index)
        with _lmdb_read_errors(where), _shared_reader(self.path).begin() as txn:
            value = txn.get(record_key(index))
        if value is None:
            raise CodeStoreError(f"{where} is missing")
        label, *grids = decode_record(value, self.metadata, where)
        return *(torch.from_numpy(codes.astype(np.int64)) for codes in grids), torch.tensor(label)


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
