"""`medsyn push`: a trained model folder and its card to the Hub."""

from __future__ import annotations

import argparse


def add_parser(commands, shown: dict) -> None:
    up = commands.add_parser("push", **shown, help="upload a trained model folder and its card to the Hub")
    up.add_argument("model_dir", help="the folder a training script wrote")
    up.add_argument("--repo-id", required=True, help="the Hub repo, user/name (created when missing)")
    up.add_argument("--private", action="store_true", help="create the repo as private")
    up.add_argument("--token", default=None, help="a Hub token (default: the one `hf auth login` stored)")
    up.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from medsyn.hub_upload import push_model_folder

    repo_id = push_model_folder(args.model_dir, args.repo_id, token=args.token, private=args.private)
    print(f"uploaded {args.model_dir} to https://huggingface.co/{repo_id}")
    return 0
