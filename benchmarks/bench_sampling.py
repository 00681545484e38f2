"""Sampling speed of ScoreLangevinPipeline against diffusers' ScoreSdeVePipeline on the same UNet.

For each resolution and batch size it prints images/s of both pipelines at the same number of network
evaluations, and the sampler efficiency = evaluations x (time of one UNet forward at that batch) / total time:
the share of sampling time spent in the network (target >= 0.95). That ratio compares two separate timings,
so on a busy machine it also carries their noise; "in-run efficiency" times the UNet calls inside the same
sampling runs (forward hooks), so its complement is the pipeline's own overhead, free of run-to-run noise.
The two pipelines run alternately and medsyn/diffusers is the median of the per-pair ratios.

diffusers' ScoreSdeVePipeline hard-codes 3 channels, so both pipelines run a 3-channel UNet here.

    python benchmarks/bench_sampling.py                      # 64 and 128 px, batch 16 and 64
    python benchmarks/bench_sampling.py --resolutions 64 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

from medsyn.models.score_unet import build_score_unet
from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.schedulers import AnnealedLangevinScheduler


class ForwardClock:
    """Sums the wall time spent inside a module's forward calls, via forward hooks."""

    def __init__(self, module: torch.nn.Module):
        self.total, self._start = 0.0, 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _leave(self, *_):
        self.total += time.perf_counter() - self._start


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(ours, theirs, repeats: int, clock: ForwardClock) -> tuple[float, float, float, float]:
    """Runs ``ours`` and ``theirs`` alternately (after one warm-up each), so that drift in the machine's speed
    falls on both alike. Returns the median time of each, the median of the per-pair ratios theirs/ours, and
    the share of ``ours``'s time spent inside ``clock``'s module."""
    ours(), theirs()
    t_ours, t_theirs, inside = [], [], 0.0
    for _ in range(repeats):
        clock.total = 0.0
        start = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - start)
        inside += clock.total
        start = time.perf_counter()
        theirs()
        t_theirs.append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(t_ours, t_theirs)]
    return statistics.median(t_ours), statistics.median(t_theirs), statistics.median(ratios), inside / sum(t_ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sde-steps", type=int, default=3, help="ScoreSdeVe steps; each is 1 corrector + 1 predictor")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    evaluations = 2 * args.sde_steps  # ScoreSdeVe: one corrector and one predictor evaluation per step
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {evaluations} network evaluations per sample")
    print("| px | batch | UNet params | forward ms | medsyn img/s | diffusers img/s | medsyn/diffusers | efficiency "
          "| in-run efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for resolution in args.resolutions:
        torch.manual_seed(0)
        unet = build_score_unet(sample_size=resolution, in_channels=3, num_classes=None, base_channels=32,
                                channel_mult=(1, 2, 2, 2)).eval()
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        clock = ForwardClock(unet)
        # Same number of evaluations: L levels x 1 step + the final denoising step = 2 x sde_steps.
        ours = ScoreLangevinPipeline(unet, AnnealedLangevinScheduler(num_train_timesteps=evaluations - 1, n_steps_each=1))
        theirs = ScoreSdeVePipeline(unet, ScoreSdeVeScheduler(num_train_timesteps=args.sde_steps))
        for pipe in (ours, theirs):
            pipe.set_progress_bar_config(disable=True)
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, resolution, resolution)
            sigma = torch.tensor(1.0)
            with torch.no_grad():
                forward = timed(lambda: unet(x, sigma), args.repeats)
            generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
            t_ours, t_theirs, ratio, in_run = timed_pair(
                lambda: ours(batch_size=batch, generator=generator(), output_type="pt"),
                lambda: theirs(batch_size=batch, num_inference_steps=args.sde_steps, generator=generator(),
                               output_type="pt"),
                args.repeats,
                clock,
            )
            print(f"| {resolution} | {batch} | {params:.1f}M | {forward * 1e3:.0f} | {batch / t_ours:.2f} | "
                  f"{batch / t_theirs:.2f} | {ratio:.3f} | {evaluations * forward / t_ours:.3f} | "
                  f"{in_run:.3f} |", flush=True)


if __name__ == "__main__":
    main()
