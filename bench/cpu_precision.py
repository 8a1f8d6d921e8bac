"""Benchmark: run.precision=bf16 against fp32 on the CPU, for extraction and training steps.

`run.precision=auto` is fp32 on the CPU: its probes extract with the frozen graph (`eval.cpu_graph`), its
steps run in fp32. `run.precision=bf16` runs both under bf16 autocast, extracting with the eager model (the
graph is fp32 only); the losses stay in fp32 either way (`bagssl_core.losses`). On a CPU that computes bf16
natively (x86 flags avx512_bf16 or amx_bf16) oneDNN's bf16 convolutions are about twice as fast as its fp32
ones. Elsewhere oneDNN emulates bf16 or falls back to plain kernels; this machine cannot measure that case,
so the first line says which CPU ran the benchmark.

This times the real code paths, the ways taking turns (`bench/patches.py:best_times`), with the shapes of
`bench/memory_format.py` (smoke: the smoke spec's trial; default: the default config):
- extraction: `aggregate.reduce_batch` of one batch of Fashion-MNIST images, fp32 eager, fp32 frozen graph
  (what a CPU probe does by default) and bf16 eager;
- training: `train.train_step` in fp32 and under bf16 autocast, each on its own copy of one seeded model.
Models are channels_last, as `model.channels_last` (default true) makes them.

Run: `python bench/cpu_precision.py [--threads N] [--repeat R] [--images N] [--batch B]` on an idle machine
(about 1.5 minutes on 2 cores with the defaults). Each line gives each way's fastest of R timed calls; the
last line gives, for the smoke shape, bf16's speed-up over what fp32 does by default, e.g. `smoke shape,
bf16 vs fp32: extraction 1.8x, training step 1.6x`.
"""

from __future__ import annotations

from pathlib import Path

# bench/ is the script's directory, so its sibling benchmarks import as top-level modules.
from memory_format import SHAPES, config, extraction_times, parse_args, seeded_model, training_times
from patches import cpu_images

from bagssl_core.models import inference_graph

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_line() -> str:
    """The CPU's model name and which of NATIVE_BF16_FLAGS it has, from /proc/cpuinfo (Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return "CPU: unknown (no /proc/cpuinfo)"
    first_processor = cpuinfo.read_text().split("\n\n", 1)[0]
    fields = {
        key.strip(): value.strip()
        for key, value in (line.split(":", 1) for line in first_processor.splitlines() if ":" in line)
    }
    name = fields.get("model name", "?")
    flags = fields.get("flags", "").split()
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    return f"CPU: {name}; native bf16: {', '.join(native) if native else 'no (emulated)'}"


def report(label: str, seconds: dict[str, float], reference: str) -> float:
    """Print each way's seconds; return the reference way's seconds over bf16's."""
    cells = ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items())
    ratio = seconds[reference] / seconds["bf16"]
    print(f"{label}: {cells}; bf16 vs {reference}: {ratio:.2f}x", flush=True)
    return ratio


def main() -> None:
    args = parse_args(__doc__, "way")
    images, header = cpu_images(args.threads, args.images)
    print(cpu_line())
    print(f"{header}; fastest of {args.repeat}")
    ratios: dict[str, tuple[float, float]] = {}
    for shape in SHAPES:
        cfg = config(shape)
        model = seeded_model(cfg).eval()
        ways = {
            "fp32 eager": (model, False),
            "fp32 graph": (inference_graph(model, cfg.in_channels, cfg.input_size), False),
            "bf16": (model, True),
        }
        chunk = cfg.eval_patch_chunk(cfg.patch_px)
        what = f"{cfg.patch_px}-px patches at {cfg.input_size} px, {chunk} a forward"
        extraction = report(
            f"{shape} extraction ({args.images} images, {what})",
            extraction_times(cfg, images, args.repeat, ways),
            "fp32 graph",
        )
        step_ways = {"fp32": (seeded_model(cfg), False), "bf16": (seeded_model(cfg), True)}
        training = report(
            f"{shape} training step ({args.batch} x {cfg.patch.num} patches)",
            training_times(cfg, args.batch, args.repeat, step_ways),
            "fp32",
        )
        ratios[shape] = (extraction, training)
    extraction, training = ratios["smoke"]
    print(f"smoke shape, bf16 vs fp32: extraction {extraction:.2f}x, training step {training:.2f}x")


if __name__ == "__main__":
    main()
