"""How far JPEG draft decoding moves a descriptor: the service's large uploads (issue 24 item 2).

Uploads of more than `serve.large_image_pixels` pixels are decoded with
`decode.load_resized(draft=True)` (a reduced DCT scale), not exactly as indexed images are. This
builds large JPEGs out of real photos at their own resolution (mosaics of `--grid` x `--grid`
photos of ../shared/data/clothing-small, no upscaling), describes each decoded both ways with the
model of an index (`serve_large_uploads.py` builds it), and prints the cosine between the two
descriptors and the time and peak memory of each decode, beside the load average.

    python benchmarks/draft_descriptors.py --index=/tmp/serve_large/clothing_index
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbir_tf.data import decode  # noqa: E402
from cbir_tf.retriever import Retriever  # noqa: E402


def mosaic(paths: list[pathlib.Path], grid: int, cell: tuple[int, int]) -> Image.Image:
    """`grid` x `grid` photos side by side, each at `cell` (their own size: no resampling)."""
    out = Image.new("RGB", (grid * cell[0], grid * cell[1]))
    for i, path in enumerate(paths[: grid * grid]):
        img = Image.open(path).convert("RGB")
        out.paste(img.crop((0, 0, *cell)), ((i % grid) * cell[0], (i // grid) * cell[1]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=pathlib.Path,
                        default=pathlib.Path("/tmp/serve_large/clothing_index"))  # fmt: skip
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    retriever = Retriever.load(args.index)
    root = pathlib.Path(json.loads((args.index / "manifest.json").read_text())["root"])
    ids = (args.index / "ids.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    cosines, times = [], {"exact": [], "draft": []}
    cell = (400, 400)  # the photos are ~400 x 533: a 10 x 10 mosaic is 16 M pixels and more
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.count):
            picked = [root / ids[i] for i in rng.choice(len(ids), args.grid**2, replace=False)]
            path = os.path.join(tmp, f"mosaic{n}.jpg")
            mosaic(picked, args.grid, cell).save(path, "JPEG", quality=90)
            pixels = {}
            for mode in ("exact", "draft"):
                t0 = time.perf_counter()
                pixels[mode] = decode.load_resized(
                    path, retriever.image_size, draft=mode == "draft"
                )
                times[mode].append(time.perf_counter() - t0)
            a, b = retriever.describe([pixels["exact"], pixels["draft"]])
            cosines.append(float(a @ b))
    out = {
        "images": args.count,
        "size": f"{args.grid * cell[0]} x {args.grid * cell[1]} JPEG (q 90), mosaics of photos",
        "image_size": retriever.image_size,
        "cosine_min": round(min(cosines), 5),
        "cosine_mean": round(float(np.mean(cosines)), 5),
        "decode_median_s": {m: round(float(np.median(t)), 3) for m, t in times.items()},
        "peak_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
