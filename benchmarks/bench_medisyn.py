"""Sampling speed and peak memory of MediSynPipeline against diffusers' StableDiffusionPipeline assembled from the
identical components (autoencoder, BERT text encoder, conditional unet, DPM-Solver scheduler).

For each resolution and step count it prints images/s of both and the overhead ratio medsyn time / diffusers
time (target <= 1.05), as the median of per-pair ratios with the two pipelines run alternately, so drift in the
machine's speed falls on both alike. The one deliberate difference: medsyn masks the prompt's padding in the
unet's cross-attention (StableDiffusionPipeline attends to every token). Peak memory is measured per pipeline in a
fresh process (CPU: peak resident set size during generation above the size before it, Linux only; GPU: peak
allocated bytes above those allocated before).

    python benchmarks/bench_medisyn.py                          # 64 and 128 px, 25 and 50 steps
    python benchmarks/bench_medisyn.py --resolutions 64 --steps 25 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import BertModel

from medsyn.data import SimulatedBrainMRI
from medsyn.models.latent_diffusion import (
    autoencoder_config,
    bert_text_encoder_config,
    build_wordpiece_tokenizer,
    conditional_unet_config,
)
from medsyn.pipelines import MediSynPipeline

PROMPT = "axial T1-weighted brain MRI, large left frontal tumor with surrounding oedema"


def components(resolution: int) -> dict:
    """Small components: 4x-downsampling autoencoder, 3-level unet (~6M parameters), 4-layer 256-wide BERT."""
    torch.manual_seed(0)
    tokenizer = build_wordpiece_tokenizer(SimulatedBrainMRI(resolution=32, seed=0).generate(200)["captions"])
    vae = AutoencoderKL(**autoencoder_config(1, 4, (32, 64, 64), layers_per_block=1, sample_size=resolution))
    text_encoder = BertModel(bert_text_encoder_config(vocab_size=tokenizer.vocab_size, hidden_size=256,
                                                      num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024))
    unet = UNet2DConditionModel(**conditional_unet_config(resolution // 4, 4, 256, (64, 128, 256), layers_per_block=1))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1)  # what StableDiffusionPipeline insists on
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                scheduler=scheduler)


def pipelines(resolution: int, device: str) -> tuple[MediSynPipeline, StableDiffusionPipeline]:
    parts = components(resolution)
    ours = MediSynPipeline(**parts).to(device)
    theirs = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False).to(device)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def generate(pipe, resolution: int, steps: int, batch: int, device: str):
    generator = torch.Generator(device).manual_seed(0)
    return pipe(PROMPT, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=4.0,
                num_images_per_prompt=batch, generator=generator, output_type="np").images


def speed_rows(args) -> list[dict]:
    rows = []
    for resolution in args.resolutions:
        ours, theirs = pipelines(resolution, args.device)
        for steps in args.steps:
            run = {name: (lambda p=pipe: generate(p, resolution, steps, args.batch_size, args.device))
                   for name, pipe in (("medsyn", ours), ("diffusers", theirs))}
            run["medsyn"](), run["diffusers"]()  # warm-up
            times = {"medsyn": [], "diffusers": []}
            for _ in range(args.repeats):
                for name in ("medsyn", "diffusers"):
                    start = time.perf_counter()
                    run[name]()
                    times[name].append(time.perf_counter() - start)
            ratio = statistics.median(m / d for m, d in zip(times["medsyn"], times["diffusers"]))
            rows.append(dict(resolution=resolution, steps=steps,
                             medsyn=args.batch_size / statistics.median(times["medsyn"]),
                             diffusers=args.batch_size / statistics.median(times["diffusers"]), ratio=ratio))
    return rows


def peak_memory(pipeline: str, resolution: int, steps: int, batch: int, device: str) -> float:
    """MiB above the post-load baseline, measured in this (fresh) process."""
    ours, theirs = pipelines(resolution, device)
    pipe = ours if pipeline == "medsyn" else theirs
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        generate(pipe, resolution, steps, batch, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one, so the peak read
    # afterwards is the generation's, not the model building's.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    generate(pipe, resolution, steps, batch, device)
    return (_status_kib("VmHWM") - base) / 1024


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def memory_rows(args) -> dict:
    peaks = {}
    for resolution in args.resolutions:
        for pipeline in ("medsyn", "diffusers"):
            command = [sys.executable, __file__, "--memory-worker", pipeline, str(resolution), str(args.steps[0]),
                       str(args.batch_size), args.device]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            peaks[(resolution, pipeline)] = json.loads(out.strip().splitlines()[-1])
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        pipeline, resolution, steps, batch, device = args.memory_worker
        print(json.dumps(peak_memory(pipeline, int(resolution), int(steps), int(batch), device)))
        return

    torch.set_grad_enabled(False)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, guidance 4 "
          f"(two unet passes per step), {args.repeats} alternating repeats")
    print("| px | steps | medsyn img/s | diffusers img/s | time ratio medsyn/diffusers |")
    print("|---|---|---|---|---|")
    for row in speed_rows(args):
        print(f"| {row['resolution']} | {row['steps']} | {row['medsyn']:.2f} | {row['diffusers']:.2f} | "
              f"{row['ratio']:.3f} |")
    peaks = memory_rows(args)
    print(f"\npeak memory above the loaded model, MiB ({args.steps[0]} steps, batch {args.batch_size})")
    print("| px | medsyn | diffusers |")
    print("|---|---|---|")
    for resolution in args.resolutions:
        print(f"| {resolution} | {peaks[(resolution, 'medsyn')]:.0f} | {peaks[(resolution, 'diffusers')]:.0f} |")


if __name__ == "__main__":
    main()
