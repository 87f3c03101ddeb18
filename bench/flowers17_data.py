"""What one Flowers-17 training epoch's data costs, from the JPEG files vs. from the decode cache.

    python bench/flowers17_data.py --root ../shared/datasets/17flowers

Both paths apply the same per-image augmentation (random resized crop, flip, RandAugment, normalise;
patches are cut later, a batch at a time) in one process; only the source differs: opening and decoding each 500 px JPEG every epoch, or the
uint8 tensors decoded once (what Flowers17DataModule does). Also times building the cache itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data.flowers17 import Flowers17, check_files  # noqa: E402
from src.data.folder import load_rgb  # noqa: E402
from src.data.transforms import photo_train_transform  # noqa: E402
from src.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/flowers17")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=680, help="one training epoch of split 1")
    args = parser.parse_args()

    transform = photo_train_transform(args.image_size, IMAGENET_MEAN, IMAGENET_STD)
    files = check_files(Path(args.root))[: args.images]
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        data = Flowers17(args.root, 2 * args.image_size, cache)
        build = time.perf_counter() - start
        start = time.perf_counter()
        Flowers17(args.root, 2 * args.image_size, cache)
        load = time.perf_counter() - start

    start = time.perf_counter()
    for path in files:
        transform(load_rgb(str(path)))
    from_files = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(files)):
        transform(data[i][0])
    from_cache = time.perf_counter() - start

    n = len(files)
    print(f"cache: built in {build:.1f} s ({len(data) / build:.0f} images/s), loaded again in {load:.2f} s")
    print(f"epoch of {n} images, one process: from JPEG files {from_files:.2f} s ({n / from_files:.0f} images/s), "
          f"from the cache {from_cache:.2f} s ({n / from_cache:.0f} images/s): {from_files / from_cache:.1f}x faster")


if __name__ == "__main__":
    main()
