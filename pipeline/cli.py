"""The `rectiflow` command: one entry point that dispatches to each package's own command.

Commands are named here as "module:function" strings and imported only when run, so this
low-level module never imports the higher packages (train/, ray_jobs/, ...) it dispatches to,
and `rectiflow --help` stays fast. Each function takes the remaining argv and returns an
exit code.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module:function", one-line help). Only commands that exist and work belong here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo.run:main", "run the whole system offline on a synthetic world (--quick)"),
    "shapes-world": ("demo.shapes_world:main", "generate the demo's synthetic shapes world and its URL lists"),
    "train-vae": ("train.autoencoder:main", "train a 16-channel AutoencoderKL on images (diffusers format)"),
    "models": ("model.cli:main", "make the offline tiny model bundle (models make-tiny OUT_DIR)"),
    "download": ("pipeline.download.cli:main", "download URL lists into shards (--retry-failed)"),
    "ingest": ("pipeline.ingest.cli:main", "ingest local WebDataset tars, image folders or HF datasets as download shards"),
    "score": ("pipeline.score.cli:main", "CLIP embeddings, CLIP/aesthetic/NSFW scores for a run's downloads"),
    "select": ("pipeline.select.cli:main", "choose samples to keep from the scores (presets); deletes nothing"),
    "inspect": ("pipeline.inspect.cli:main", "print a run's funnel, or why a uid was dropped (--uid)"),
    "curate": ("ray_jobs.curate:main", "run download, score, select on Ray (embedded Ray if no cluster)"),
    "caption": ("captioning.cli:main", "recaption kept samples with a VLM, with provenance"),
    "dedup": ("dedup.cli:main", "exact, perceptual and semantic dedup of a run's scored samples"),
    "encode": ("pipeline.encode.cli:main", "precompute SD3 latents + text embeddings into training shards"),
    "train": ("train.cli:main", "train an MMDiT with rectified flow on training shards (--config PRESET)"),
    "export": ("train.export:main", "export a checkpoint's EMA transformer as a diffusers SD3 directory"),
    "sample": ("train.sample:main", "generate PNGs from a checkpoint and prompts (Euler + CFG)"),
}


def _usage() -> str:
    width = max((len(name) for name in COMMANDS), default=0)
    lines = [
        "usage: rectiflow <command> [args]",
        "",
        "Curate image-text data on Ray and train SD3-style rectified-flow models.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", "Run `rectiflow <command> --help` for a command's options."]
    return "\n".join(lines)


def resolve(name: str):
    """Import and return the function behind command `name`."""
    module_name, function_name = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rectiflow: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(resolve(name)(rest) or 0)


def run() -> None:
    """Console-script entry point."""
    # img2dataset imports albumentations, which otherwise checks for updates over the network.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())


if __name__ == "__main__":
    run()
