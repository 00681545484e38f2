"""``medsyn serve`` under load on loopback, against the same model driven by ``medsyn generate`` in one process.

A small class-conditional score model (random weights: throughput does not depend on training) is saved once.
First ``medsyn generate`` makes ``--baseline-images`` images in this process: the images/s a single process gets
with nothing else running. Then the service runs as its own process (``medsyn serve``), and for each client count
N, N client threads each submit jobs of ``--job-images`` images for ``--seconds`` seconds, poll each job until it
is done, and download its zip. Reported per N: delivered images/s and its ratio to the baseline (the target is
>= 0.9 under load, which the worker's batching across jobs has to earn), p50/p95/p99 of the submit and download
requests (the long polls wait by design) and of job latency (submission to download), failed requests, and the
server's resident memory before and after.
Throughput is the server's own count of images generated during the run (its metrics), so jobs still running
at the end count for what they did; "delivered" counts only images whose zip a client had downloaded by then.
Clients learn of a job's end by long poll (``GET /api/v1/jobs/ID?wait=10``), not by asking every few ms.

    python benchmarks/bench_service.py                       # 1, 4 and 16 clients, 60 s each
    python benchmarks/bench_service.py --clients 4 --seconds 20 --quality-index 1000

With ``--quality-index N`` the server runs the QA gate against N index images: ``medsyn generate``'s baseline
images tiled to N with +-1 grey level of noise, so that the gate's statistics checks pass as they would against a
model's real training set while the nearest-neighbour search costs what an N-image index costs.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np


def build_model(folder: Path, resolution: int) -> None:
    import torch

    from medsyn.models.score_unet import build_score_unet
    from medsyn.pipelines import ScoreLangevinPipeline
    from medsyn.schedulers import AnnealedLangevinScheduler

    torch.manual_seed(0)
    unet = build_score_unet(sample_size=resolution, in_channels=1, num_classes=2, base_channels=32,
                            channel_mult=(1, 2, 2), layers_per_block=1, norm_num_groups=8)
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=40, sigma_max=20.0, sigma_min=0.05)
    ScoreLangevinPipeline(unet=unet, scheduler=scheduler, class_names=["healthy", "tumor"]).save_pretrained(folder)


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return f"{p50:.3f} / {p95:.3f} / {p99:.3f}"


def worker_counts(base: str) -> tuple[float, float, float]:
    """(batches, images in them, images recorded) the server's worker has made so far, from its metrics."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    names = ("medsyn_batch_images_count", "medsyn_batch_images_sum", "medsyn_images_generated_total")
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(names)}
    return tuple(values.get(name, 0.0) for name in names)


def gate_milliseconds(index: Path, images: np.ndarray, repeats: int = 5) -> float:
    """Median time of the QA gate's verdicts on one batch of ``images`` (uint8) against ``index``."""
    from medsyn.serving.quality_gate import QualityGate

    gate = QualityGate.from_image_sets(str(index))
    batch = images[..., None].astype(np.float32) / 255
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        gate.check(batch)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times[1:]))


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    """N clients submitting, polling and downloading jobs until a deadline."""

    def __init__(self, base: str, request: dict, wait: float):
        self.base, self.request, self.wait = base, request, wait
        self.request_seconds: list[float] = []
        self.job_seconds: list[float] = []
        self.images = self.failures = 0
        self.lock = threading.Lock()

    def call(self, path: str, body: dict | None = None, timed: bool = True) -> bytes | None:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                content = reply.read()
        except (urllib.error.URLError, OSError):
            with self.lock:
                self.failures += 1
            return None
        if timed:
            with self.lock:
                self.request_seconds.append(time.perf_counter() - started)
        return content

    def client(self, number: int, deadline: float) -> None:
        seed = number * 100_000
        while time.monotonic() < deadline:
            started = time.perf_counter()
            reply = self.call("/api/v1/generate", {**self.request, "seed": seed})
            seed += 1
            if reply is None:
                continue
            job_id = json.loads(reply)["id"]
            while True:
                state = self.call(f"/api/v1/jobs/{job_id}?wait={self.wait}", timed=False)
                if state is None or json.loads(state)["status"] in ("done", "failed", "cancelled"):
                    break
            if state is None or json.loads(state)["status"] != "done":
                with self.lock:
                    self.failures += 1
                continue
            archive = self.call(f"/api/v1/jobs/{job_id}/images")
            if archive is None:
                continue
            count = sum(name.endswith(".png") for name in zipfile.ZipFile(io.BytesIO(archive)).namelist())
            if time.monotonic() <= deadline:
                with self.lock:
                    self.images += count
                    self.job_seconds.append(time.perf_counter() - started)

    def run(self, clients: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.client, args=(i, deadline)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sampler", default="edm-heun")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (EDM Heun: 2N - 1 evaluations)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration per client count")
    parser.add_argument("--job-images", type=int, default=4, help="images per job")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's and the baseline's batch size")
    parser.add_argument("--baseline-images", type=int, default=256)
    parser.add_argument("--wait", type=float, default=10.0, help="a client's long poll: GET /jobs/ID?wait=SECONDS")
    parser.add_argument("--quality-index", type=int, default=0,
                        help="give the server a QA index of this many images (0: no QA gate)")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()

    from medsyn.cli import main as medsyn

    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    build_model(work / "model", args.resolution)
    common = ["--model", str(work / "model"), "--class-label", "tumor", "--sampler", args.sampler,
              "--num-inference-steps", str(args.steps)]
    medsyn(["generate", *common, "--num-images", "16", "--output-dir", str(work / "warm-up"), "--format", "npz"])
    started = time.perf_counter()
    medsyn(["generate", *common, "--num-images", str(args.baseline_images), "--batch-size", str(args.max_batch),
            "--output-dir", str(work / "baseline"), "--format", "npz"])
    baseline = args.baseline_images / (time.perf_counter() - started)

    command = [sys.executable, "-m", "medsyn.cli", "serve", "--model", f"brain={work / 'model'}", "--storage",
               str(work / "storage"), "--port", str(args.port), "--max-batch", str(args.max_batch), "--device", "cpu",
               "--max-samples", str(max(64, args.job_images))]
    if args.quality_index:  # the baseline's own images, tiled to the size asked for: statistics the model meets
        made = np.load(work / "baseline" / "samples.npz")["images"]
        tiles = np.resize(made, (args.quality_index, *made.shape[1:])).astype(np.int16)
        jitter = np.random.default_rng(0).integers(-1, 2, tiles.shape)
        np.savez(work / "index.npz", images=np.clip(tiles + jitter, 0, 255).astype(np.uint8))
        command += ["--train-index", f"brain={work / 'index.npz'}"]
        gate_ms = gate_milliseconds(work / "index.npz", made[: args.max_batch])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the server exited at start-up") from None
                time.sleep(0.2)
        request = {"model": "brain", "class_label": "tumor", "n_samples": args.job_images, "sampler": args.sampler,
                   "num_inference_steps": args.steps, "quality_check": bool(args.quality_index)}
        Load(base, request, args.wait).run(1, 5)  # warm-up: first batch, allocator
        rows = []
        for clients in args.clients:
            before, counts = resident_mib(server.pid), worker_counts(base)
            load = Load(base, request, args.wait)
            started = time.perf_counter()
            load.run(clients, args.seconds)
            batches, batched, generated = (b - a for a, b in zip(counts, worker_counts(base)))
            rate = generated / (time.perf_counter() - started)
            rows.append((clients, rate, rate / baseline, load.images / args.seconds, batched / max(1.0, batches),
                         percentiles(load.request_seconds),
                         percentiles(load.job_seconds), len(load.request_seconds), load.failures, before,
                         resident_mib(server.pid)))
    finally:
        server.terminate()
        server.wait(30)

    print(f"\n{args.resolution} px score model, {args.sampler} {args.steps} steps, {args.job_images} images a job, "
          f"batch {args.max_batch}, QA index {args.quality_index or 'none'}; baseline `medsyn generate`: "
          f"{baseline:.2f} images/s")
    if args.quality_index:
        print(f"QA gate: {gate_ms:.1f} ms per batch of {args.max_batch} against {args.quality_index} images "
              f"(sampling the batch: {1000 * args.max_batch / baseline:.0f} ms)")
    print("| clients | generated images/s | vs generate | delivered images/s | mean batch | request s p50/p95/p99 | "
          "job s p50/p95/p99 | requests | failed | RSS MiB before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients, rate, ratio, delivered, mean_batch, request_p, job_p, count, failed, before, after in rows:
        print(f"| {clients} | {rate:.2f} | {ratio:.2f} | {delivered:.2f} | {mean_batch:.1f} | {request_p} | {job_p} | "
              f"{count} | {failed} | {before:.0f} -> {after:.0f} |")


if __name__ == "__main__":
    main()
