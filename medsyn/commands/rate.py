"""`medsyn rate`: the page where experts rate generated images (the RLHF selector's data)."""

from __future__ import annotations

import argparse

from medsyn.validation import count_argument


def add_parser(commands, shown: dict) -> None:
    rate_parser = commands.add_parser("rate", **shown,
                                      help="a web page on localhost where experts rate generated images 1-3")
    rate_parser.add_argument("--images", required=True,
                             help="generated images: medsyn generate's samples.npz, an image folder or a manifest")
    rate_parser.add_argument("--ratings", required=True,
                             help="the JSON-lines ratings file (created, then appended to)")
    rate_parser.add_argument("--model", default=None, help="the generator's name, recorded with each rating")
    rate_parser.add_argument("--host", default="127.0.0.1", help="address to serve on (localhost only by default)")
    rate_parser.add_argument("--port", type=count_argument(1), default=8765, help="port to serve on")
    rate_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Serve the rating page for --images until interrupted; ratings go to --ratings as they are given."""
    import uvicorn

    from medsyn.rlhf.rating_app import create_rating_app
    from medsyn.rlhf.rating_images import load_images_to_rate
    from medsyn.rlhf.ratings import RatingsFile

    images = load_images_to_rate(args.images)
    ratings = RatingsFile(args.ratings)
    ratings.ratings()  # a corrupt ratings file is named now, not at the first rating
    print(f"rating {len(images)} images from {args.images} into {args.ratings}: open http://{args.host}:{args.port}/"
          "?rater=YOUR_ID (add &aspect=prompt_match to rate the match to the prompt)", flush=True)
    uvicorn.run(create_rating_app(images, ratings, args.model), host=args.host, port=args.port, log_level="warning")
    return 0
