"""`transformer vit VERB`: train a ViT classifier on an image folder or a bundled set, predict, draw its attention."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from transformer.cli import flags
from transformer.cli.common import command, number, say, writable_file

# A small ViT trained from scratch: AdamW with weight decay, short warm-up, cosine decay.
TRAIN_DEFAULTS = dict(preset="tiny", lr=1e-3, schedule="cosine", warmup=100, beta2=0.99, adam_eps=1e-8,
                      weight_decay=0.05, clip_norm=1.0, max_steps=2000, valid_every=250, keep_last=3)


def _train(args: argparse.Namespace) -> None:
    flags.needs_images(args)
    from transformer.tasks.vision import ViTConfig, train_vit

    cfg = ViTConfig(loop=flags.loop_config(args), images=Path(args.images) if args.images else None,
                    bundled=args.bundled, batch_size=args.batch_size, shift=args.shift, rotate=args.rotate,
                    scale=args.scale)
    train_vit(cfg, flags.vision_config(args), say=say)


def _load(args: argparse.Namespace):
    from transformer.store.kinds import load_vit
    from transformer.device import resolve_device

    flags.required(args, "model")
    return load_vit(Path(args.model), resolve_device(args.device))


def _predict(args: argparse.Namespace) -> None:
    flags.needs_images(args)
    from transformer.api.load import load_as
    from transformer.api.vision import ImageClassifier
    from transformer.images.data import read_folder
    from transformer.tasks.vision import accuracy, splits

    flags.required(args, "model")
    classifier = load_as(ImageClassifier, args.model, device=args.device)
    if args.files:
        for file, (label, prob) in zip(args.files, classifier.predict(list(args.files))):
            print(f"{file}\t{label}\t{prob:.3f}")
    if args.images or args.bundled:
        cfg = classifier.config
        data = (read_folder(Path(args.images), cfg.channels, (cfg.image_height, cfg.image_width)) if args.images
                else splits(None, args.bundled)["test"])
        with torch.no_grad():
            right = accuracy(classifier.model, data)
        print(f"accuracy {right:.4f} on {len(data)} images ({args.images or f'the test part of {args.bundled}'})")


def _attention(args: argparse.Namespace) -> None:
    flags.needs_images(args)  # first: matplotlib, imported below, needs Pillow
    from transformer.images.data import read_images
    from transformer.report.image_attention import plot_image_attention, vit_attention

    writable_file(args.out, "--out", create_folders=True)
    model, cfg, meta = _load(args)
    image = read_images([Path(args.image)], cfg.channels, (cfg.image_height, cfg.image_width))[0]
    maps, labels, label = vit_attention(model, image)
    classes = meta.get("classes") or [str(i) for i in range(cfg.n_classes)]
    query = "[CLS]" if cfg.pool == "cls" else "mean of the patches"
    print(plot_image_attention(image, maps, labels, f"{args.image}: class {classes[label]}; attention of {query}",
                               Path(args.out)))


def register(sub) -> None:
    p = command(sub, "train", _train, "Train a ViT classifier on an image folder or a bundled set.")
    flags.images(p)
    data = p.add_argument_group("batches")
    flags.batch_size(data, 64, "images per batch")
    data.add_argument("--shift", type=number(float, 0), default=1.0,
                      help="augmentation: move each training image by up to this many pixels along each axis")
    data.add_argument("--rotate", type=number(float, 0, 180), default=0.0,
                      help="augmentation: turn each training image by up to this many degrees")
    data.add_argument("--scale", type=number(float, 0, 1, below=True), default=0.0,
                      help="augmentation: scale each training image by a factor within 1 ± this")
    flags.vision_model(p, "tiny")
    flags.loop(p)
    flags.fine_tuning(p)
    p.set_defaults(**TRAIN_DEFAULTS)

    p = command(sub, "predict", _predict, "Classify image files; with --images or --bundled, report accuracy.")
    flags.model_dir(p)
    p.add_argument("files", nargs="*", metavar="IMAGE", help="PNG or JPEG files of the model's size")
    flags.images(p)
    flags.device(p)

    p = command(sub, "attention", _attention, "Draw the attention over the patches of one image, every layer (PNG).")
    flags.image_attention(p)
