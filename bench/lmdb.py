"""The `lmdb` benchmark: a code database of realistic size read through a torch DataLoader, records/s
with 0, 2 and 4 worker processes under the fork and spawn start methods, interleaved in one run."""

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from bench.common import (OtherCpuUse, Report, add_common_arguments, apply_defaults, load_average, log, machine_info,
                          machine_lines, seconds)
from pipelines.infer.extract import write_codes
from pipelines.store.codes import CodeDataset, record_size

CONTEXTS = ("fork", "spawn")
# the paper's ImageNet 256 setting: 32x32 top and 64x64 bottom grids of 512 codes, 1000 classes
LMDB_FULL_DEFAULTS = dict(records=20_000, top=32, bottom=64, codes=512, classes=1000, batch_size=64,
                          seconds=8.0, rounds=2, workers=[0, 2, 4])
# --quick: seconds; spawn workers start slowly (each imports torch), so only 2 of them
LMDB_QUICK_DEFAULTS = dict(records=400, top=4, bottom=8, codes=16, classes=10, batch_size=16,
                           seconds=0.3, rounds=1, workers=[0, 2])
WRITE_BATCH = 500  # records per transaction while building the database


def variant_name(workers, context):
    return "main process" if workers == 0 else f"{context}, {workers} workers"


def build_database(path, args, generator):
    """A complete database of random codes and labels, written with the store's writer (no VQ-VAE)."""
    plan = dict(top_shape=[args.top, args.top], bottom_shape=[args.bottom, args.bottom], top_codes=args.codes,
                bottom_codes=args.codes, n_classes=args.classes, vqvae_sha256="0" * 64, image_size=8 * args.bottom,
                source={"data": "random codes (bench/lmdb.py)", "split": "train"})

    def batches():
        for start in range(0, args.records, WRITE_BATCH):
            n = min(WRITE_BATCH, args.records - start)
            yield (torch.randint(0, args.classes, (n,), generator=generator),
                   torch.randint(0, args.codes, (n, args.top, args.top), generator=generator),
                   torch.randint(0, args.codes, (n, args.bottom, args.bottom), generator=generator))

    start = time.perf_counter()
    count = write_codes(path, plan, batches())
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "records_per_s": count / elapsed, "record_bytes": record_size(plan),
            "database_bytes": (Path(path) / "data.mdb").stat().st_size}


def read_for(path, workers, context, duration, batch_size, seed):
    """Reads random records (uniform, with replacement) for `duration` seconds once every worker has
    delivered its first batch; -> records read, seconds, records/s, start-up seconds, and other
    processes' CPU use from the workers' start to their end (the workers count as ours)."""
    codes = CodeDataset(path)
    top_shape = tuple(codes.metadata["top_shape"])
    sampler = RandomSampler(codes, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(codes, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        multiprocessing_context=context if workers else None)
    with OtherCpuUse(include_children=True) as contention:
        started = time.perf_counter()
        batches = iter(loader)
        for _ in range(max(workers, 1)):  # batches come from the workers in turn: each has started
            next(batches)
        startup = time.perf_counter() - started
        records = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            top, bottom, label = next(batches)
            assert top.shape[1:] == top_shape and len(bottom) == len(label), "malformed batch"
            records += len(label)
        del batches  # stops the workers and waits for them
    return {"records": records, "seconds": elapsed, "records_per_s": records / elapsed, "startup_s": startup,
            "other_cpu_use": contention.fraction}


def bench_reading(path, variants, args):
    """Every variant `rounds` times, the order alternating from round to round; medians."""
    runs = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
        for name in order:
            workers, context = variants[name]
            run = read_for(path, workers, context, args.seconds, args.batch_size, args.seed + round_index)
            runs[name].append(run)
            log(f"  round {round_index + 1}/{args.rounds}, {name}: {run['records_per_s']:,.0f} records/s, "
                f"start-up {seconds(run['startup_s'])}, other CPU {run['other_cpu_use']:.0%}")
    main = statistics.median(run["records_per_s"] for run in runs["main process"])
    return {name: summarise(runs[name], *variants[name], main) for name in variants}


def summarise(runs, workers, context, main_records_per_s):
    records_per_s = statistics.median(run["records_per_s"] for run in runs)
    return {
        "workers": workers,
        "context": context,
        "records_per_s": records_per_s,
        "speedup_vs_main_process": records_per_s / main_records_per_s,
        "startup_s": statistics.median(run["startup_s"] for run in runs),
        "other_cpu_use_median": statistics.median(run["other_cpu_use"] for run in runs),
        "records_read": sum(run["records"] for run in runs),
        "runs": runs,
    }


def run(args):
    """Builds a code database of realistic size with the store's writer (random codes, no VQ-VAE):
    by default 20,000 records of 32x32 top and 64x64 bottom uint16 codes and a label, as 256x256
    images give (10,244 bytes a record, about 205 MB), in a temporary directory. Then reads it
    through torch DataLoaders, batch 64, records drawn uniformly at random (as a shuffled epoch
    reads them), for a fixed time per run: in the main process (0 workers), and with 2 and 4
    worker processes started by fork and by spawn. Each run's clock starts once every worker has
    delivered its first batch (start-up is reported apart); the page cache is warm (the database
    was just written). Variants alternate order from round to round; medians of records/s.
    Prints a table and writes lmdb.json and lmdb.md to --out. --quick: 400 tiny records, seconds."""
    apply_defaults(args, LMDB_QUICK_DEFAULTS if args.quick else LMDB_FULL_DEFAULTS)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    variants = {"main process": (0, None)}
    variants |= {variant_name(workers, context): (workers, context)
                 for workers in sorted(set(args.workers) - {0}) for context in CONTEXTS}
    with tempfile.TemporaryDirectory(prefix="bench-lmdb-") as tmp:
        path = Path(tmp) / "codes.lmdb"
        log(f"writing {args.records:,} records ({args.top}x{args.top} top, {args.bottom}x{args.bottom} bottom codes)")
        build = build_database(path, args, torch.Generator().manual_seed(args.seed))
        log(f"  {build['database_bytes'] / 1e6:.0f} MB in {seconds(build['seconds'])}; reading "
            f"{args.seconds:g} s per run, {args.rounds} rounds of {len(variants)} variants")
        read = bench_reading(path, variants, args)
    results = {
        "benchmark": "lmdb",
        **info,
        "load_average_after": load_average(),
        "quick": args.quick,
        "config": {
            "records": args.records,
            "top_shape": [args.top, args.top],
            "bottom_shape": [args.bottom, args.bottom],
            "codebook_size": args.codes,
            "n_classes": args.classes,
            "record_bytes": build["record_bytes"],
            "batch_size": args.batch_size,
            "seconds_per_run": args.seconds,
            "rounds": args.rounds,
            "sampler": "uniform random record indices, with replacement",
            "seed": args.seed,
        },
        "build": build,
        "read": read,
    }
    REPORT.publish(results, args.out)


def add_arguments(parser):
    full, quick = LMDB_FULL_DEFAULTS, LMDB_QUICK_DEFAULTS
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run in seconds: {quick['records']} records of {quick['top']}x{quick['top']} / "
                             f"{quick['bottom']}x{quick['bottom']} codes, workers {quick['workers']}")
    parser.add_argument("--records", type=int, help=f"records in the database (default {full['records']:,})")
    parser.add_argument("--top", type=int, help=f"top grid side (default {full['top']})")
    parser.add_argument("--bottom", type=int, help=f"bottom grid side (default {full['bottom']})")
    parser.add_argument("--codes", type=int, help=f"codebook size (default {full['codes']})")
    parser.add_argument("--classes", type=int, help=f"classes (default {full['classes']})")
    parser.add_argument("--batch-size", type=int, help=f"records per batch (default {full['batch_size']})")
    parser.add_argument("--seconds", type=float, help=f"reading time per run (default {full['seconds']:g})")
    parser.add_argument("--rounds", type=int, help=f"runs per variant, interleaved (default {full['rounds']})")
    parser.add_argument("--workers", type=int, nargs="+",
                        help=f"DataLoader worker counts besides 0 (default {' '.join(map(str, full['workers'][1:]))})")
    add_common_arguments(parser, "lmdb", seed_help="seed of the codes and of the records read")


# -- output -----------------------------------------------------------------------------------


def lmdb_rows(results):
    """One row per worker count: records/s under fork and spawn side by side, then start-up, other CPU."""
    read = results["read"]
    record_bytes = results["config"]["record_bytes"]
    rows = []
    for workers in sorted({r["workers"] for r in read.values()}):
        cells = [read[variant_name(workers, context)] for context in CONTEXTS]  # main process: twice
        if workers == 0:
            rows.append(("0 (main process)", f"{cells[0]['records_per_s']:,.0f}", "same (no processes to start)",
                         f"{cells[0]['records_per_s'] * record_bytes / 1e6:.0f}", "-", "-",
                         f"{cells[0]['other_cpu_use_median']:.0%}"))
            continue
        rows.append((
            str(workers),
            *(f"{c['records_per_s']:,.0f} ({c['speedup_vs_main_process']:.2f}x)" for c in cells),
            " / ".join(f"{c['records_per_s'] * record_bytes / 1e6:.0f}" for c in cells),
            *(seconds(c["startup_s"]) for c in cells),
            " / ".join(f"{c['other_cpu_use_median']:.0%}" for c in cells),
        ))
    return rows


LMDB_HEADER = ("workers", "fork: records/s (vs 0 workers)", "spawn: records/s (vs 0 workers)",
               "MB/s fork / spawn", "fork start-up", "spawn start-up", "other CPU fork / spawn")


def lmdb_summary_lines(results):
    c, build, read = results["config"], results["build"], results["read"]
    lines = [
        f"{c['records']:,} records of {c['top_shape'][0]}x{c['top_shape'][1]} top and {c['bottom_shape'][0]}x"
        f"{c['bottom_shape'][1]} bottom uint16 codes + int32 label ({c['record_bytes']:,} bytes each; data.mdb "
        f"{build['database_bytes'] / 1e6:.0f} MB), written with pipelines.infer.extract.write_codes in "
        f"{seconds(build['seconds'])} ({build['records_per_s']:,.0f} records/s, {WRITE_BATCH} records a transaction)",
        f"read: CodeDataset in a torch DataLoader, batch {c['batch_size']}, {c['sampler']}; each run reads for "
        f"{c['seconds_per_run']:g} s after every worker delivered its first batch (start-up: time to that point); "
        f"{c['rounds']} rounds, variants interleaved, medians; page cache warm (database just written)",
        f"records read in all: {sum(r['records_read'] for r in read.values()):,}, every batch well-formed, "
        "no errors",
        *machine_lines(results),
    ]
    return lines


REPORT = Report("lmdb", "LMDB code database benchmark: DataLoader reads, fork vs spawn workers",
                lambda results: (LMDB_HEADER, lmdb_rows(results), lmdb_summary_lines(results)),
                quick="a tiny database")
