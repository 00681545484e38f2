"""The ``medsyn`` subcommands, one module each: ``add_parser(commands, shown)`` declares its flags and ``run(args)``
does the work. Heavy imports happen inside ``run``, so ``medsyn --help`` answers at once."""

from . import attack, demo, evaluate, evaluate_expert, generate, pixel_noise_baseline, push, rate, serve

COMMANDS = (demo, generate, pixel_noise_baseline, evaluate, evaluate_expert, push, rate, attack, serve)
"""In the order ``medsyn --help`` lists them."""
