"""`transformer caption VERB`: train an image captioner over a frozen LM, generate captions, draw its attention."""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, number, say, writable_file

TRAIN_DEFAULTS = dict(preset="tiny", lr=1e-3, schedule="cosine", warmup=100, beta2=0.99, adam_eps=1e-8,
                      weight_decay=0.0, clip_norm=1.0, max_steps=2000, valid_every=250, keep_last=3, bundled="digits")


def _train(args: argparse.Namespace) -> None:
    flags.needs_images(args)
    from transformer.tasks.caption import CaptionTrainConfig, train_captioner

    flags.required(args, "lm")
    cfg = CaptionTrainConfig(
        loop=flags.loop_config(args), lm=Path(args.lm), vit=Path(args.vit) if args.vit else None,
        images=Path(args.images) if args.images else None,
        bundled=None if args.images else args.bundled, bridge=args.bridge, n_queries=args.n_queries,
        bridge_layers=args.bridge_layers, cross_every=args.cross_every, batch_size=args.batch_size,
    )
    train_captioner(cfg, flags.vision_config(args), say=say)


def _load(args: argparse.Namespace):
    from transformer.store.kinds import load_captioner, load_tokenizer
    from transformer.device import resolve_device

    flags.required(args, "model")
    model, cfg, _ = load_captioner(Path(args.model), resolve_device(args.device))
    return model, cfg, load_tokenizer(Path(args.model))


def _generate(args: argparse.Namespace) -> None:
    flags.needs_images(args)
    import torch

    from transformer.api.load import load_as
    from transformer.api.vision import Captioner
    from transformer.images.captions import compose
    from transformer.inference.captions import generate
    from transformer.tasks.caption import held_out_digits

    flags.required(args, "model")
    captioner = load_as(Captioner, args.model, device=args.device)
    if args.files:
        for file, text in zip(args.files, captioner.caption(list(args.files), args.beam, args.alpha)):
            print(f"{file}\t{text}")
    if args.images or args.bundled:
        images, captions = compose(held_out_digits(Path(args.images) if args.images else None, args.bundled),
                                   args.canvases, seed=2)
        with torch.no_grad():
            texts = generate(captioner.model, captioner.tokenizer, images, args.beam, args.alpha)
        right = sum(a == b for a, b in zip(texts, captions))
        print(f"exact match {right / len(captions):.4f} on {len(captions)} held-out canvases")


def _attention(args: argparse.Namespace) -> None:
    flags.needs_images(args)  # first: matplotlib, imported below, needs Pillow
    from transformer.images.data import read_images
    from transformer.report.image_attention import caption_attention, plot_image_attention

    writable_file(args.out, "--out", create_folders=True)
    model, cfg, tokenizer = _load(args)
    image = read_images([Path(args.image)], cfg.vision.channels, cfg.image_size)[0]
    maps, labels, text = caption_attention(model, tokenizer, image)
    print(plot_image_attention(image, maps, labels, f"{cfg.bridge}: {text!r}", Path(args.out)))


def register(sub) -> None:
    p = command(sub, "train", _train, "Train a captioner on composed digit canvases: a ViT and a bridge to a frozen "
                                      "language model (lm train on caption text), or a plain encoder-decoder.")
    p.add_argument("--lm", help="the language model's run directory (lm train); frozen. Its vocabulary is used "
                                "by every bridge")
    p.add_argument("--vit", help="a ViT run directory (vit train on the same digits): the image encoder, frozen; "
                                 "without it, a new ViT of the model flags' shape is trained with the bridge")
    flags.images(p)
    g = p.add_argument_group("bridge")
    g.add_argument("--bridge", choices=["qformer", "flamingo", "encoder-decoder"], default="qformer",
                   help="Q-Former prefix (BLIP-2), gated cross-attention (Flamingo), or a decoder trained from scratch")
    g.add_argument("--n-queries", type=number(int, 1), default=32, help="Q-Former: learned queries")
    g.add_argument("--bridge-layers", type=number(int, 1), default=2, help="Q-Former: layers")
    g.add_argument("--cross-every", type=number(int, 1), default=2,
                   help="cross-attention every k layers (Q-Former's layers; Flamingo: the LM's layers)")
    flags.batch_size(g, 32, "canvases per batch")
    flags.vision_model(p, "tiny")
    flags.loop(p)
    p.set_defaults(**TRAIN_DEFAULTS)

    p = command(sub, "generate", _generate, "Caption image files; with --bundled (its test part) or --images (a "
                                            "folder of held-out digits), report exact match on canvases of them.")
    flags.model_dir(p)
    p.add_argument("files", nargs="*", metavar="IMAGE", help="PNG or JPEG files of the model's canvas size")
    flags.images(p)
    p.add_argument("--canvases", type=number(int, 1), default=500, help="held-out canvases to compose")
    flags.beam(p)
    p.set_defaults(beam=1)
    flags.device(p)

    p = command(sub, "attention", _attention, "Draw each caption token's attention over the image patches (PNG).")
    flags.image_attention(p)
