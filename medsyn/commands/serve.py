"""`medsyn serve`: the REST service (jobs, QA gate, DICOM, database), or its API keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsyn.validation import count_argument


def add_parser(commands, shown: dict) -> None:
    sv = commands.add_parser("serve", **shown, help="a REST service that generates images as jobs, QA-gated")
    sv.add_argument("--model", action="append", metavar="NAME=DIR_OR_HUB_ID",
                    help="a saved medsyn pipeline to serve under NAME; repeat for several")
    sv.add_argument("--storage", default="medsyn-serve", help="folder for released images (and the SQLite file)")
    sv.add_argument("--database", default=None,
                    help="a SQLAlchemy URL (postgresql://user@host/db) or a SQLite file path (default: "
                         "STORAGE/medsyn.sqlite)")
    sv.add_argument("--train-index", action="append", metavar="NAME=SET",
                    help="the model's training images (folder, manifest or .npz, as medsyn evaluate reads), for the "
                         "QA gate; quality_check is then on by default for NAME")
    sv.add_argument("--held-out-index", action="append", metavar="NAME=SET",
                    help="held-out real images of NAME's data: also withhold images closer to a training image than "
                         "the 1st percentile of held-out patients")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (others need API keys)")
    sv.add_argument("--port", type=count_argument(1), default=8000, help="port to listen on")
    sv.add_argument("--device", default=None, help="torch device for the models (default: cuda if available)")
    sv.add_argument("--max-samples", type=count_argument(), default=64, help="most images one job may ask for")
    sv.add_argument("--max-steps", type=count_argument(), default=1000,
                    help="most num_inference_steps (and n_steps_each) a job may ask for")
    sv.add_argument("--max-batch", type=count_argument(), default=16, help="most images per network batch")
    sv.add_argument("--max-prompt-characters", type=count_argument(), default=1000, help="longest prompt accepted")
    sv.add_argument("--max-body-bytes", type=count_argument(), default=64 * 1024, help="largest request body")
    sv.add_argument("--create-key", metavar="NAME", help="create an API key called NAME, print it and exit")
    sv.add_argument("--admin", action="store_true", help="with --create-key: the key sees every caller's jobs")
    sv.add_argument("--revoke-key", metavar="NAME", help="revoke the API key called NAME and exit")
    sv.add_argument("--list-keys", action="store_true", help="list the API keys (names, state, limits) and exit")
    sv.add_argument("--key-requests-per-minute", type=count_argument(), default=60, help="the new key's rate limit")
    sv.add_argument("--key-images-per-day", type=count_argument(), default=10_000, help="the new key's image quota")
    sv.set_defaults(handler=run)


def named_values(values: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a mapping; each name at most once."""
    mapping = {}
    for value in values or []:
        name, separator, text = value.partition("=")
        if not separator or not name or not text:
            raise ValueError(f"{flag} {value!r}: expected NAME=VALUE")
        if name in mapping:
            raise ValueError(f"{flag}: {name!r} is given twice")
        mapping[name] = text
    return mapping


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def run(args: argparse.Namespace) -> int:
    """Serve models as a REST API with jobs (see README: Serving); or manage its API keys and exit."""
    import uvicorn

    from medsyn.output_files import safe_file_stem
    from medsyn.serving.api_keys import create_api_key, keys_configured, list_api_keys, revoke_api_key
    from medsyn.serving.app import create_app
    from medsyn.serving.database import open_database
    from medsyn.serving.quality_gate import QualityGate, is_gate_file
    from medsyn.serving.served_model import ServedModel
    from medsyn.serving.service import GenerationService, ServiceLimits

    storage = Path(args.storage)
    sessions = open_database(args.database or str(storage / "medsyn.sqlite"))
    if args.create_key:
        with sessions() as session:
            key = create_api_key(session, args.create_key, args.key_requests_per_minute, args.key_images_per_day,
                                 admin=args.admin)
        print(f"API key {args.create_key!r}{' (admin)' if args.admin else ''} (shown once, stored only as a hash): "
              f"{key}")
        return 0
    if args.revoke_key:
        with sessions() as session:
            revoke_api_key(session, args.revoke_key)
            active = keys_configured(session)
        print(f"API key {args.revoke_key!r} revoked; a running server refuses it from its next request on"
              + ("" if active else ". No active key is left: a server started with keys now refuses every call "
                                   "until a new key is created"))
        return 0
    if args.list_keys:
        with sessions() as session:
            for key in list_api_keys(session):
                print(f"{key.name}\t{'revoked' if key.revoked else 'active'}\t{'admin' if key.admin else 'caller'}\t"
                      f"{key.requests_per_minute}/min\t{key.images_per_day} images/day\tcreated "
                      f"{key.created_at:%Y-%m-%d %H:%M}")
        return 0
    sources = named_values(args.model, "--model")
    if not sources:
        raise ValueError("give at least one --model NAME=DIR_OR_HUB_ID")
    indices, held_out = named_values(args.train_index, "--train-index"), named_values(args.held_out_index,
                                                                                      "--held-out-index")
    for name in [*indices, *held_out]:
        if name not in sources:
            raise ValueError(f"--train-index/--held-out-index {name!r}: no --model of that name")
    for name in held_out:
        if name not in indices:
            raise ValueError(f"--held-out-index {name!r} calibrates a --train-index; give that too")
    with sessions() as session:
        secured = keys_configured(session)
    if not secured and args.host not in LOOPBACK_HOSTS:
        raise ValueError(f"--host {args.host}: without API keys the service listens on localhost only; create one "
                         "with --create-key NAME first")
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    models = {}
    for name, source in sources.items():
        gate = QualityGate.from_image_sets(indices[name], held_out.get(name)) if name in indices else None
        if gate is not None and not is_gate_file(indices[name]):
            saved = storage / "qa-index" / f"{safe_file_stem(name)}.npz"
            saved.parent.mkdir(parents=True, exist_ok=True)
            gate.save(saved)
            print(f"QA index of {name} saved to {saved}: pass it as --train-index {name}={saved} to skip building "
                  "and calibrating it again", flush=True)
        models[name] = ServedModel.load(name, source, device, gate)
        print(f"loaded {name} from {source} in {models[name].load_seconds:.1f} s (version {models[name].version}"
              f"{', QA index of ' + str(len(gate.train)) + ' images' if gate else ', no QA index'})", flush=True)
    limits = ServiceLimits(max_samples=args.max_samples, max_steps=args.max_steps, max_batch=args.max_batch,
                           max_prompt_characters=args.max_prompt_characters, max_body_bytes=args.max_body_bytes)
    service = GenerationService(models, sessions, storage, limits)
    if not secured:
        print("no API keys: anyone on this machine may call the service; it listens on localhost only", flush=True)
    print(f"serving on http://{args.host}:{args.port}/ (API under /api/v1, metrics at /metrics)", flush=True)
    uvicorn.run(create_app(service, require_keys=secured), host=args.host, port=args.port, log_level="warning")
    return 0
