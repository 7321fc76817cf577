"""Peak memory of the start-up image check on a memory-mapped image dataset (issue 13, item 5).

Writes N noise JPEGs (incompressible, so the dataset's size is its pixel data) as a `datasets.Image` column to disk,
then, each in a fresh process on the memory-mapped dataset, measures how much the peak resident memory grows while
* `whole column`: iterating `dataset[column]` with decoding off, as the check did before;
* `check_rows`: the current check (`trl_gndpo.checks.check_rows`, a slice of rows at a time, every image decoded).

    python benchmarks/image_check_memory.py [--images 300] [--side 768] [--column image|images]
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> dict:
    """Resident memory now: anonymous (the process's own copies) and file-backed (pages of the memory-mapped dataset,
    shared with the page cache and dropped under pressure)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def measure(path: str, mode: str) -> dict:
    from datasets import Image, load_from_disk

    sys.path.insert(0, str(REPO))
    from trl_gndpo import checks

    dataset = load_from_disk(path)
    before, peak, done = rss_mb(), {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def sample() -> None:  # peak of each kind, every 5 ms
        while not done.wait(0.005):
            for key, value in rss_mb().items():
                peak[key] = max(peak[key], value)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    if mode == "whole column":  # the previous check's reading: cast to undecoded images, iterate the column
        column = dataset.column_names[-1]
        feature = dataset.features[column]
        undecoded = Image(decode=False) if isinstance(feature, Image) else type(feature)(Image(decode=False))
        for _ in dataset.cast_column(column, undecoded)[column]:
            pass
    else:
        checks.check_rows(dataset, "train_dataset")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    growth = {f"peak_{key}_growth_mb": round(peak[key] - before[key], 1) for key in peak}
    return {"mode": mode, **growth, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--column", choices=["image", "images"], default="image", help="one image, or a list of one")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    import numpy as np
    import PIL.Image
    from datasets import Dataset, Features, Image, List, Value

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        noise = rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
        PIL.Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    with tempfile.TemporaryDirectory() as tmp:
        images = [{"bytes": jpeg(), "path": None} for _ in range(args.images)]
        size_mb = sum(len(image["bytes"]) for image in images) / 2**20
        feature = Image() if args.column == "image" else List(Image())
        column = images if args.column == "image" else [[image] for image in images]
        features = Features({"prompt": Value("string"), args.column: feature})
        Dataset.from_dict(
            {"prompt": ["Describe."] * args.images, args.column: column}, features=features
        ).save_to_disk(tmp)
        del images
        print(f"{args.images} JPEGs of {args.side}x{args.side}: {size_mb:.0f} MB on disk")
        for mode in ("whole column", "check_rows"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", tmp, mode], capture_output=True, text=True, check=True
            ).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
