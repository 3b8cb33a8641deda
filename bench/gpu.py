"""The `gpu` benchmark: what one CUDA GPU does with this code, for `make gpu-check`.

- training steps/s of the cifar10 preset and of the paper-size priors (`vqvae2-top`,
  `vqvae2-bottom`, and the FFHQ-1024 bottom prior `vqvae2-ffhq-bottom`) in bf16 autocast, as the trainers run them, with model FLOP/s against the bf16
  matmul peak measured in the same run, and the memory per example (the growth of peak memory
  between two batch sizes);
- the VQ-VAE at 256x256: training images/s, and code extraction images/s in fp32 and bf16 with
  the fraction of codes bf16 changes (random weights: an upper bound's order, not the trained
  figure);
- hierarchical sampling: 16 samples, top 32x32 then bottom 64x64 given it with the cached
  sampler, then decoding to 256x256, in fp32 and bf16, with the time per position of each level,
  and the network part of one cached step replayed as a CUDA graph against eager;
- sampling throughput: the two paper priors' cached steps (row start and step, the draw and the
  write-back included) at batch 16, 64, 256 and sample.py's --batch-size auto plan, eager against
  captured as CUDA graphs (sample.py --capture), as samples/s and the projected time for 50,000.

Every model has random (data-initialised) weights: what is timed is the arithmetic, which does
not depend on them.
"""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Report, add_common_arguments, load_average, log, machine_info, random_inputs, random_pixels
from pipelines.infer.generation import free_bytes
from prior import PixelSNAIL, get_preset
from prior.drawing import Drawing
from prior.noise import SampleKeys
from prior.sampling import CachedSteps, IncrementalPixelSNAIL, start_job
from vqvae import VQVAE2, VQVAE2Config

CUDA = torch.device("cuda")

# (preset, two batch sizes per process: steps/s at the first, memory per example from both). The
# FFHQ-1024 top and middle priors are vqvae2-top's and vqvae2-bottom's networks (prior/presets.py):
# their figures are those rows'; its bottom prior (128x128) runs at its preset's batch of 4, the
# second size kept small (~8 GiB per example expected: 4x the 2 GiB vqvae2-bottom took at 64x64 on an H200).
# A case ending in FUSED steps Adam's fused kernels instead of its default (foreach on CUDA, the
# trainers' optimizer): cifar10's small tensors make its step launch-bound, where fewer launches may help.
FUSED = "fused Adam"
TRAIN_CASES = [("cifar10", 8, 32), ("cifar10", 64, 128), ("cifar10", 64, 128, FUSED), ("vqvae2-top", 16, 32),
               ("vqvae2-bottom", 8, 16), ("vqvae2-ffhq-bottom", 4, 5)]
SAMPLING_BATCHES = (16, 64, 256, "auto")
PROJECTED_SAMPLES = 50_000
QUICK_TRAIN_CASES = [("tiny", 4, 8), ("tiny", 4, 8, FUSED)]
# The pixel preset trained once more at the batch that fills the device: the largest multiple of 8 whose
# step fits FILL_SHARE of the free memory, from its first case's peak and memory per example.
FILL = "the batch that fills the device"
FILL_SHARE = 0.8  # the allocator's slack and fragmentation take the rest
FILL_LIMIT, QUICK_FILL_LIMIT = 4096, 16
QUICK_SAMPLING_BATCHES, QUICK_PROJECTED_SAMPLES = (4, "auto"), 8


def autocast(precision):
    return torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def timed(call, repeats, warmup=1):
    """Seconds of each of `repeats` calls, the GPU synchronised around each."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_peak(side):
    a, b = (torch.randn(side, side, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
    best = min(timed(lambda: a @ b, repeats=10, warmup=3))
    return 2 * side**3 / best


def model_inputs(config, batch_size, generator):
    """(x, label, cond) on the GPU, random, for a PixelSNAIL of `config`."""
    return [None if t is None else t.to(CUDA) for t in random_inputs(config, batch_size, generator)]


def build(config, seed):
    torch.manual_seed(seed)
    model = PixelSNAIL(config).to(CUDA)
    model.init_from_data(*model_inputs(config, 4, torch.Generator().manual_seed(seed)))
    return model


def train_step(model, optimizer, inputs):
    with autocast("bf16"):
        loss = model.nll(*inputs).mean()  # the likelihood itself runs in fp32
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_training(preset, batch_sizes, steps, seed, variant=None):
    config = get_preset(preset).model
    model = build(config, seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.95, 0.9995), fused=True if variant == FUSED else None)
    generator = torch.Generator().manual_seed(seed)
    peaks, seconds, flops = {}, None, None
    for batch_size in batch_sizes:
        inputs = model_inputs(config, batch_size, generator)
        train_step(model, optimizer, inputs)  # the optimizer state exists from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_seconds = timed(lambda: train_step(model, optimizer, inputs), repeats=steps)
        peaks[batch_size] = torch.cuda.max_memory_allocated()
        if seconds is None:
            seconds = step_seconds
            with FlopCounterMode(display=False) as counter:
                train_step(model, optimizer, inputs)
            flops = counter.get_total_flops()
    small, *larger = batch_sizes  # one size: steps/s only; two: the memory per example too
    second = sorted(seconds)[len(seconds) // 2]
    return {"preset": case_name(preset, variant), "parameters": model.num_parameters(), "batch_size": small,
            "seconds_per_step": second, "examples_per_s": small / second, "flops_per_step": flops,
            "flops_per_s": flops / second, "peak_bytes": peaks,
            "bytes_per_example": (peaks[larger[0]] - peaks[small]) / (larger[0] - small) if larger else None}


def filling_batch(case, free, limit):
    """The largest multiple of 8 (at most `limit`) whose training step fits FILL_SHARE of `free` bytes,
    from `case`'s peak memory at its batch and its memory per example."""
    per_example = case["bytes_per_example"]
    if not per_example or per_example <= 0:
        raise ValueError(f"{case['preset']}: no memory per example measured")
    fixed = case["peak_bytes"][case["batch_size"]] - case["batch_size"] * per_example
    return int(min(limit, max(8, (FILL_SHARE * free - fixed) // per_example // 8 * 8)))


def measured(name, call):
    """call() -> its case, or {preset: name, error: ...} when it fails (out of memory, say): the other
    cases are reported all the same."""
    try:
        return call()
    except Exception as error:
        return {"preset": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"[:300]}
    finally:
        torch.cuda.empty_cache()


def case_name(preset, variant=None):
    return preset if variant is None else f"{preset} ({variant})"


def bench_vqvae(size, batch_size, repeats, seed):
    torch.manual_seed(seed)
    model = VQVAE2(VQVAE2Config()).to(CUDA, memory_format=torch.channels_last)
    images = random_pixels(batch_size, (size, size), torch.Generator().manual_seed(seed)).to(CUDA)
    images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        with autocast("bf16"):
            loss = model(images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    train_seconds = sorted(timed(step, repeats))[repeats // 2]
    model.eval()
    extraction, codes = {}, {}
    for precision in ("fp32", "bf16"):
        def encode():
            with autocast(precision):
                codes[precision] = model.encode(images)
        extraction[precision] = batch_size / sorted(timed(encode, repeats))[repeats // 2]
    changed = [(a != b).float().mean().item() for a, b in zip(codes["fp32"], codes["bf16"])]
    return {"size": size, "batch_size": batch_size, "train_images_per_s": batch_size / train_seconds,
            "extract_images_per_s": extraction, "bf16_changed_codes": {"top": changed[0], "bottom": changed[1]}}


def forward_flops(model, inputs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def bench_hierarchical_sampling(n, top_preset, bottom_preset, seed):
    """Seconds to sample n top grids, n bottom grids given them, and to decode, per precision."""
    top, bottom = (build(get_preset(name).model, seed).eval() for name in (top_preset, bottom_preset))
    torch.manual_seed(seed)
    vqvae = VQVAE2(VQVAE2Config()).to(CUDA, memory_format=torch.channels_last).eval()
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.randint(0, top.config.n_classes, (n,), generator=generator).to(CUDA)
              if top.config.n_classes else None)
    results = {}
    for precision in ("fp32", "bf16"):
        draw = torch.Generator(CUDA).manual_seed(seed)
        seconds = {}
        with autocast(precision):
            for level, model in (("top", top), ("bottom", bottom)):
                cond = results.get("top_codes")
                torch.cuda.synchronize()
                start = time.perf_counter()
                codes = model.sample(n, labels if model.config.n_classes else None, cond, generator=draw)
                torch.cuda.synchronize()
                seconds[level] = time.perf_counter() - start
                results[f"{level}_codes"] = codes
            torch.cuda.synchronize()
            start = time.perf_counter()
            images = vqvae.decode_codes(results["top_codes"], results["bottom_codes"])
            torch.cuda.synchronize()
            seconds["decode"] = time.perf_counter() - start
        results[precision] = {"seconds": seconds, "total_seconds": sum(seconds.values()),
                              "image_shape": list(images.shape)}
        del results["top_codes"], results["bottom_codes"]
    per_level = {}
    for level, model in (("top", top), ("bottom", bottom)):
        inputs = model_inputs(model.config, n, generator)
        graph = {}
        for precision in ("fp32", "bf16"):
            try:
                graph[precision] = bench_graph_step(model, n, inputs[1], inputs[2], precision)
            except Exception as error:  # capture can fail: report why instead of a number
                graph[precision] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"[:300]}
        positions = model.config.shape[0] * model.config.shape[1]
        flops_per_position = forward_flops(model, inputs) / positions  # a full forward, spread evenly
        per_level[level] = {"preset": top_preset if model is top else bottom_preset, "positions": positions,
                            "forward_flops_per_position": flops_per_position,
                            **{f"{p}_seconds_per_position": results[p]["seconds"][level] / positions
                               for p in ("bf16", "fp32")}, "graph_step": graph}
    return {"n": n, "precisions": {p: results[p] for p in ("bf16", "fp32")}, "levels": per_level}


def prepared_step(model, n, labels, cond):
    """A cached sampler of `model` (batch n) ready for one step at (i, j), the third row's middle
    (past the first rows: every stream and cache in use): -> (network, (i, j)), where
    `network.output_at(i, j)` is the network part of that step, as many times as asked.

    The positions before (i, j) are fed in raster order, drawn as zeros: the sampler computes at
    each row's first position what the rows above determine, a two-stream model's vertical stream
    among it. A step at (i, j) of a fresh sampler skips that, and a two-stream model's gated
    resnets then get no vertical input (bench/results/gpu.md's bottom-prior rows: elu(None))."""
    height, width = model.config.shape
    i, j = min(2, height - 1), width // 2
    device = model.background.device
    network = IncrementalPixelSNAIL(model, n, model.condition(n, labels, cond), static=True)
    if model.config.pixel_mode:
        drawn = torch.zeros(n, 3, 1, 1, device=device)
    else:
        drawn = torch.zeros(n, 1, 1, dtype=torch.long, device=device)
    for position in range(i * width + j):
        network.output_at(*divmod(position, width))
        network.write(*divmod(position, width), drawn)
    return network, (i, j)


def bench_graph_step(model, n, labels, cond, precision, repeats=50):
    """The network part of one cached sampling step (`prepared_step`), eager against a CUDA graph
    replay of it: how much of a step is launch overhead. (The write-back checks the drawn values
    on the host, which a graph cannot capture.) Without gradients, as the sampler runs it."""
    # autocast's weight-cast cache would hold tensors made outside the graph: off in both variants
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                                         cache_enabled=False):
        network, (i, j) = prepared_step(model, n, labels, cond)
        eager = sorted(timed(lambda: network.output_at(i, j), repeats, warmup=3))[repeats // 2]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                network.output_at(i, j)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            network.output_at(i, j)
        replay = sorted(timed(graph.replay, repeats))[repeats // 2]
    return {"eager_seconds": eager, "graph_seconds": replay, "speedup": eager / replay}


def time_cached_steps(model, n, capture, seed):
    """Seconds of one row start and of one step (output, draw, write-back) of the cached sampler at
    batch n, eager or replayed as CUDA graphs (prior.sampling.CachedSteps), in bf16 autocast. Every
    step runs the same ops on the same shapes (the attention over all N slots, the later ones
    masked), so row 0's steps time every position."""
    generator = torch.Generator().manual_seed(seed)
    _, labels, cond = model_inputs(model.config, n, generator)
    width = model.config.shape[1]
    with torch.no_grad(), autocast("bf16"):
        job = start_job(model, n, labels, cond, None, 0, Drawing())
        condition = model.condition(job.batch_size, job.label, job.cond)
        network = IncrementalPixelSNAIL(model, job.batch_size, condition, static=True)
        steps = CachedSteps(model, job, network, SampleKeys.of(seed, range(n), CUDA), capture)
        steps.start_row()  # captures (and warms up) the row start
        steps.step()  # and the step, at position 0
        row_start = sorted(timed(steps.start_row, 5))[2]
        step = sorted(timed(steps.step, width - 2))[(width - 2) // 2]
    return {"row_start_seconds": row_start, "step_seconds": step}


def bench_sampling_throughput(top_preset, bottom_preset, seed, batches=SAMPLING_BATCHES, projected=PROJECTED_SAMPLES):
    """Samples/s of the two paper priors together (decoding not counted) at each of `batches`,
    eager and captured; `auto` is sample.py's plan for `projected` samples."""
    from pipelines.device import make_runtime
    from pipelines.infer.generation import SampleJob, plan_batch_size

    priors = {"top": build(get_preset(top_preset).model, seed).eval(),
              "bottom": build(get_preset(bottom_preset).model, seed).eval()}
    auto, plan = plan_batch_size(priors, make_runtime(CUDA.type, "bf16"),
                                 SampleJob((0,) if priors["top"].config.n_classes else (None,), projected, seed))
    log(plan)
    cases = []
    for batch in batches:
        n = auto if batch == "auto" else batch
        for mode in ("eager", "captured"):
            case = {"batch": batch, "n": n, "mode": mode, "levels": {}}
            try:
                for level, model in priors.items():
                    height, width = model.config.shape
                    timing = time_cached_steps(model, n, mode == "captured", seed)
                    grid = height * timing["row_start_seconds"] + height * width * timing["step_seconds"]
                    case["levels"][level] = {**timing, "grid_seconds": grid}
                    torch.cuda.empty_cache()
                seconds = sum(level["grid_seconds"] for level in case["levels"].values())
                case.update(samples_per_s=n / seconds, projected_seconds=projected / n * seconds)
            except Exception as error:  # out of memory at a large batch, a capture that fails: say which
                case["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"[:300]
                torch.cuda.empty_cache()
            log(f"sampling batch {batch} ({n}) {mode}: {case.get('samples_per_s', case.get('error'))}")
            cases.append(case)
    return {"plan": plan, "auto": auto, "presets": [top_preset, bottom_preset], "projected_samples": projected,
            "cases": cases}


def run(args):
    """What one CUDA GPU does with this code: training steps/s and memory per example of the
    cifar10 and paper-size prior presets (bf16), VQ-VAE training and extraction images/s at
    256x256, and 16 hierarchical samples (top, bottom, decode) in fp32 and bf16.

    python -m bench gpu           # a few minutes on one GPU
    python -m bench gpu --quick   # smoke run with tiny models
    """
    if CUDA.type == "cuda" and not torch.cuda.is_available():  # (tests stand the CPU in for it)
        raise SystemExit("error: the gpu benchmark needs CUDA, and torch sees no GPU here")
    results = {**machine_info(), "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
               "bf16_matmul_peak_flops": matmul_peak(1024 if args.quick else 8192)}
    log(f"{results['gpu']}: bf16 matmul peak {results['bf16_matmul_peak_flops'] / 1e12:.0f} TFLOP/s")
    results["training"] = []
    cases = QUICK_TRAIN_CASES if args.quick else TRAIN_CASES
    for k, (preset, small, large, *variant) in enumerate(cases):
        if args.presets and preset not in args.presets:
            continue
        case = measured(case_name(preset, *variant),
                        lambda: bench_training(preset, (small, large), args.steps, args.seed, *variant))
        results["training"].append(case)
        log(f"train {case}")
        if k == 0:  # the pixel preset's first case: again at the batch that fills the device
            limit = QUICK_FILL_LIMIT if args.quick else FILL_LIMIT
            filled = measured(case_name(preset, FILL), lambda: bench_training(
                preset, (filling_batch(case, free_bytes(CUDA), limit),), args.steps, args.seed, FILL))
            results["training"].append(filled)
            log(f"train {filled}")
    results["vqvae"] = bench_vqvae(32 if args.quick else 256, 8 if args.quick else 64, args.steps, args.seed)
    log(f"vqvae {results['vqvae']}")
    top, bottom = ("cpu-top", "cpu-bottom") if args.quick else ("vqvae2-top", "vqvae2-bottom")
    results["sampling"] = bench_hierarchical_sampling(args.n_samples, top, bottom, args.seed)
    log(f"sampling {results['sampling']}")
    results["throughput"] = bench_sampling_throughput(top, bottom, args.seed, *(
        (QUICK_SAMPLING_BATCHES, QUICK_PROJECTED_SAMPLES) if args.quick else (SAMPLING_BATCHES, PROJECTED_SAMPLES)))
    results["load_average_after"] = load_average()
    REPORT.publish(results, args.out)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per training case (default 10)")
    parser.add_argument("--n-samples", type=int, default=16, help="hierarchical samples (default 16)")
    parser.add_argument("--presets", nargs="+", help="train only these of the training cases (default: all)")
    add_common_arguments(parser, "gpu", "seed of weights and inputs")


# -- reports ----------------------------------------------------------------------------------


def training_rows(results):
    peak = results["bf16_matmul_peak_flops"]
    rows = []
    for case in results["training"]:
        if "error" in case:
            rows.append([case["preset"], "", "", "", "", "", case["error"]])
            continue
        per_example = case.get("bytes_per_example")
        rows.append([case["preset"], f"{case['parameters'] / 1e6:.1f}M", str(case["batch_size"]),
                     f"{1 / case['seconds_per_step']:.2f}", f"{case['flops_per_s'] / 1e12:.0f} TFLOP/s",
                     f"{case['flops_per_s'] / peak:.0%}", "" if per_example is None else f"{per_example / 2**20:.0f} MiB"])
    return rows


TRAIN_HEADER = ["preset", "parameters", "batch", "steps/s (bf16)", "model FLOP/s", "of bf16 peak",
                "memory per example"]


def summary_lines(results):
    v, s = results["vqvae"], results["sampling"]
    lines = [f"{results['gpu']}, CUDA {results['cuda']}, torch {results['torch']}, {results['date']}; "
             f"bf16 matmul peak {results['bf16_matmul_peak_flops'] / 1e12:.0f} TFLOP/s",
             f"VQ-VAE-2 at {v['size']}x{v['size']}, batch {v['batch_size']}: training {v['train_images_per_s']:.0f} "
             f"images/s (bf16); extraction {v['extract_images_per_s']['fp32']:.0f} images/s fp32, "
             f"{v['extract_images_per_s']['bf16']:.0f} bf16 (random weights: bf16 changes "
             f"{v['bf16_changed_codes']['top']:.1%} of top and {v['bf16_changed_codes']['bottom']:.1%} of bottom codes)"]
    for precision, timing in s["precisions"].items():
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timing["seconds"].items())
        lines.append(f"{s['n']} hierarchical samples in {precision}: {timing['total_seconds']:.1f} s ({parts})")
    peak = results["bf16_matmul_peak_flops"]
    for level, info in s["levels"].items():
        rate = info["forward_flops_per_position"] / info["bf16_seconds_per_position"]
        lines.append(f"{level} ({info['preset']}, {info['positions']} positions): "
                     f"{info['bf16_seconds_per_position'] * 1e3:.2f} ms per position in bf16, "
                     f"{info['fp32_seconds_per_position'] * 1e3:.2f} ms in fp32; about {rate / 1e12:.2f} TFLOP/s "
                     f"({rate / peak:.2%} of the bf16 peak; FLOPs of a full forward spread over its positions)")
        for precision, graph in info["graph_step"].items():
            lines.append(f"{level}, network part of one cached step in {precision}: " + (
                graph["error"] if "error" in graph else
                f"eager {graph['eager_seconds'] * 1e3:.2f} ms, CUDA graph replay {graph['graph_seconds'] * 1e3:.2f} ms "
                f"({graph['speedup']:.1f}x)"))
    return lines


def throughput_lines(results):
    """The sampling throughput table as note lines (the report has one table: training's)."""
    t = results.get("throughput")
    if not t:
        return []
    lines = [f"sampling throughput, {' + '.join(t['presets'])} (cached sampler, bf16, decoding not counted): {t['plan']}"]
    for case in t["cases"]:
        name = f"batch {case['batch']}" + (f" ({case['n']})" if case["batch"] == "auto" else "") + f", {case['mode']}"
        if "error" in case:
            lines.append(f"{name}: {case['error']}")
            continue
        steps = ", ".join(f"{level} {v['step_seconds'] * 1e3:.2f} ms/step, {v['row_start_seconds'] * 1e3:.2f} ms/row start"
                          for level, v in case["levels"].items())
        projected = t.get("projected_samples", PROJECTED_SAMPLES)  # runs from before it was recorded: 50,000
        lines.append(f"{name}: {case['samples_per_s']:.1f} samples/s; {projected:,} samples in "
                     f"{case['projected_seconds'] / 60:.1f} minutes ({steps})")
    return lines


REPORT = Report("gpu", "One GPU: training, extraction and hierarchical sampling",
                lambda results: (TRAIN_HEADER, training_rows(results), summary_lines(results) + throughput_lines(results)))
