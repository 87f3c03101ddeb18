"""What a trained ViT says about one image, or many.

    python classify.py                        # a validation image of the dataset it was trained on
    python classify.py --index 42             # another one
    python classify.py cat.jpg photos/        # your own images: files and folders
    python classify.py cat.jpg --json         # machine-readable
    python classify.py cat.jpg --attention attention.png
    python classify.py --export model.safetensors

The checkpoint defaults to the best one of the newest run (the run folder under data/lightning/ whose
last.ckpt was written last); --checkpoint picks another, a .ckpt from train.py or a .safetensors
from --export. Checkpoints are loaded weights-only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from src.data.folder import IMAGE_EXTENSIONS, is_image_file, load_rgb
from src.errors import UserError
from src.inference import (
    Classifier,
    default_checkpoint,
    export_safetensors,
    load_classifier,
    pick_device,
    top_k,
)
from src.visualize import attention_rollout, prediction_figure, to_pixels

MAX_PANELS = 36  # an attention picture larger than this is unreadable


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to the image files inside them (sorted)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p.name))
            if not found:
                raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist")
    return files


def dataset_sample(classifier: Classifier, index: int) -> tuple[str, Image.Image, int]:
    """(label, raw image, target) of validation image `index` of the training run's dataset."""
    val_set = classifier.datamodule().val_set
    if not 0 <= index < len(val_set):
        raise UserError(f"--index {index} is out of range: the validation split has {len(val_set)} "
                        f"images (0-{len(val_set) - 1})")
    image, target = val_set.dataset[val_set.indices[index]]  # raw image, before any transform
    return f"validation image {index}", image, int(target)


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def save_attention_picture(panels: list[tuple], out: Path) -> None:
    """One overlay panel per (pixels, rollout, prediction entry), prediction in the title."""
    titles, correct = [], []
    for _, _, entry in panels:
        p = entry["predicted"]
        title = f"{Path(entry['image']).name}\n{p['name']} ({p['probability']:.2f})"
        if "target" in entry:
            title += f", true: {entry['target']['name']}"
            correct.append(p["index"] == entry["target"]["index"])
        titles.append(title)
    figure = prediction_figure(torch.stack([p[0] for p in panels]), titles, correct or None,
                               heatmaps=torch.stack([p[1] for p in panels]))
    figure.suptitle("attention rollout", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)


def run(args: argparse.Namespace) -> dict:
    """Classify what `args` names; returns the report that main() prints."""
    device = pick_device(args.device)
    if args.checkpoint:
        path, why = Path(args.checkpoint), "given"
    else:
        path, why = default_checkpoint()
    classifier = load_classifier(path, device)
    report: dict = {"checkpoint": str(path), "checkpoint_choice": why, "predictions": []}
    if args.export:
        export_safetensors(classifier, Path(args.export))
        report["exported"] = args.export
        if not args.images and args.index is None:
            return report

    if args.images:
        if args.index is not None:
            raise UserError("--index picks a dataset image; it cannot be combined with IMAGE arguments")
        samples = [(str(p), p, None) for p in image_files(args.images)]
    else:
        samples = [dataset_sample(classifier, args.index or 0)]

    names = classifier.class_names
    panels: list[tuple] = []
    for chunk in batches(samples, args.batch_size):
        # Decoded as the run's image folder decoded its evaluation images (JPEGs at reduced scale).
        images = [load_rgb(str(img), size=classifier.hparams["image_size"]) if isinstance(img, Path) else img
                  for _, img, _ in chunk]
        patches = torch.stack([classifier.preprocess(img) for img in images]).to(device)  # (B, N, P*P*C)
        probabilities = classifier.probabilities(patches).cpu()
        for (label, _, target), probs in zip(chunk, probabilities):
            ranked = top_k(probs, names, args.top_k)
            entry = {"image": label, "predicted": ranked[0], "top_k": ranked}
            if target is not None:
                entry["target"] = {"index": target, "name": names[target]}
            report["predictions"].append(entry)
        if args.attention and len(panels) < MAX_PANELS:
            keep = patches[: MAX_PANELS - len(panels)]
            model = classifier.model
            rollout = attention_rollout(model.attention_maps(keep), model.global_pool).cpu()
            hp = classifier.hparams
            pixels = to_pixels(keep, hp["image_size"], hp["patch_size"], hp["mean"], hp["std"])
            panels += list(zip(pixels, rollout, report["predictions"][-len(chunk):]))

    if args.attention:
        save_attention_picture(panels, Path(args.attention))
        report["attention"] = args.attention
    return report


def print_text(report: dict) -> None:
    print(f"Checkpoint: {report['checkpoint']} ({report['checkpoint_choice']})")
    if "exported" in report:
        print(f"Exported weights and settings to {report['exported']}")
    many = len(report["predictions"]) > 1
    for entry in report["predictions"]:
        p = entry["predicted"]
        if many or "target" not in entry:
            print(f"\n{entry['image']}")
        print(f"Predicted class: {p['index']} - {p['name']} ({p['probability']:.2f})")
        if "target" in entry:
            print(f"Target class: {entry['target']['index']} - {entry['target']['name']}")
        if len(entry["top_k"]) > 1:
            ranked = ", ".join(f"{t['name']} {t['probability']:.2f}" for t in entry["top_k"])
            print(f"Top {len(entry['top_k'])}: {ranked}")
    if "attention" in report:
        print(f"\nAttention picture: {report['attention']}")


def main(argv: list[str] | None = None) -> int:
    """Parse, classify, print; user errors are one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--checkpoint", help="a .ckpt from train.py or a .safetensors from --export")
    parser.add_argument("--index", type=int, help="which validation image, without IMAGE (default 0)")
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--attention", metavar="OUT.png", help="save attention-rollout overlays")
    parser.add_argument("--export", metavar="OUT.safetensors", help="save weights + settings as safetensors")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    try:
        report = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
