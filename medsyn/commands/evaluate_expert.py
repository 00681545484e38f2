"""`medsyn evaluate-expert`: generation accuracy of models under one expert classifier, paired by seed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsyn.commands.common import would_overwrite
from medsyn.validation import count_argument, number_argument


def add_parser(commands, shown: dict) -> None:
    ex = commands.add_parser("evaluate-expert", **shown,
                             help="generation accuracy under an expert classifier, paired by seed")
    ex.add_argument("--model", action="append", required=True,
                    help="a saved pipeline; repeat to compare models (differences are against the first)")
    ex.add_argument("--expert", required=True, help="the expert classifier folder (train_scripts/train_expert.py)")
    ex.add_argument("--prompts", help="JSON string or file: class name -> prompt, for text-guided (MediSyn) models")
    ex.add_argument("--per-class", type=count_argument(), default=32, help="images per class and seed")
    ex.add_argument("--seeds", type=count_argument(0), nargs="+", default=list(range(5)),
                    help="one evaluation per seed, the same for every model (the paper averaged 15)")
    ex.add_argument("--num-inference-steps", type=count_argument(), default=None,
                    help="sampling steps (default: the pipeline's)")
    ex.add_argument("--guidance-scale", type=number_argument(0), default=None,
                    help="guidance weight (default: the pipeline's)")
    ex.add_argument("--output-dir", required=True, help="folder for expert_accuracy.json")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing expert_accuracy.json")
    ex.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generation accuracy of one or more models under one expert, paired by seed; writes expert_accuracy.json."""
    from medsyn.evaluation.generation_accuracy import ExpertClassifier, generation_accuracy, paired_difference
    from medsyn.output_files import check_writable, write_text_atomically
    from medsyn.pipelines import load_pipeline
    from medsyn.training.script_args import json_argument

    target = Path(args.output_dir) / "expert_accuracy.json"
    if would_overwrite([target], args.overwrite):
        return 2
    prompts = json_argument(args.prompts) if args.prompts else None
    try:
        expert = ExpertClassifier.from_pretrained(args.expert)
    except (OSError, ValueError) as error:
        raise ValueError(f"--expert {args.expert}: no classifier could be loaded from there ({error})") from None
    results = {}
    for model in args.model:
        pipeline = load_pipeline(model)
        pipeline.set_progress_bar_config(disable=True)
        results[model] = generation_accuracy(
            pipeline, expert, args.per_class, args.seeds, prompts=prompts if hasattr(pipeline, "tokenizer") else None,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        )
        print(f"{model}: generation accuracy {results[model]['accuracy_mean']:.3f} "
              f"+- {results[model]['accuracy_std']:.3f} over seeds {args.seeds}")
    baseline = args.model[0]
    comparisons = {model: paired_difference(results[baseline], results[model]) for model in args.model[1:]}
    for model, difference in comparisons.items():
        print(f"{model} - {baseline}: {difference['accuracy_difference_mean']:+.3f} "
              f"+- {difference['accuracy_difference_std']:.3f} (same seeds, paired)")
    check_writable(target.parent)
    summary = {"expert": args.expert, "models": results, "paired_vs_first": comparisons}
    write_text_atomically(target, json.dumps(summary, indent=2))
    print(f"wrote {target}")
    return 0
