"""Ingest throughput on MIMIC-sized DICOMs, beside pydicom's bare decode and a naive loop, in one run.

    .venv/bin/python bench/ingest_throughput.py [--images 24] [--workers 2] [--repeats 3] [--j2k 2]

Writes synthetic 2544x3056 12-bit uncompressed films (a smooth phantom plus noise; every third MONOCHROME1,
every other one with window tags) to a temporary folder once, reads them once so that every method finds them in
the page cache, then prints images/s for each method at 512 and 128 px, best of --repeats passes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from tasks.data.dicom import load_dicom
from tasks.data.ingest_images import ImageItem, ingest_shard

ROWS, COLUMNS = 2544, 3056


def write_films(folder: Path, count: int, syntax=ExplicitVRLittleEndian) -> list[Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    base = 1800 + 900 * np.sin(x / 240) * np.cos(y / 310) + 600 * np.exp(-((x - COLUMNS / 2) / 500) ** 2)
    paths = []
    for index in range(count):
        stored = np.clip(base + rng.normal(0, 60, base.shape), 0, 4095).astype(np.uint16)
        monochrome1 = index % 3 == 0
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.ViewPosition = "AP"
        if index % 2:
            ds.WindowCenter, ds.WindowWidth = 2048, 3500
        ds.PixelData = (4095 - stored if monochrome1 else stored).tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        path = folder / f"film{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pydicom_decode(path: Path, resolution: int) -> None:
    pydicom.dcmread(path).pixel_array


def naive(path: Path, resolution: int) -> None:
    """What a first script does: float copy, min-max (or window), invert, PIL resize of the full image, crop."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if "WindowCenter" in ds:
        low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
        pixels = np.clip((pixels - low) / float(ds.WindowWidth), 0, 1)
    else:
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 1 - pixels
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def load(path: Path, resolution: int) -> None:
    load_dicom(path, resolution)


def per_file(method: Callable[[Path, int], None], paths: list[Path], resolution: int, repeats: int) -> float:
    """Images/s, best of `repeats` passes in this process."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            method(path, resolution)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def ingest(pool: ProcessPoolExecutor, workers: int, paths: list[Path], resolution: int, repeats: int,
           published_sha256: bool, scratch: Path) -> float:
    """Images/s of ingest_shard over the pool, one shard per worker, best of `repeats` runs into fresh data roots."""
    items = [ImageItem(dicom_id=path.stem, subject_id=10000032, study_id=50414267, view_position="AP",
                       source_path=path, sha256="0" * 64 if published_sha256 else None)  # published: taken as is
             for path in paths]
    shards = [items[index::workers] for index in range(workers)]
    best = float("inf")
    for _ in range(repeats):
        data_root = Path(tempfile.mkdtemp(dir=scratch))
        start = time.perf_counter()
        futures = [pool.submit(ingest_shard, data_root, f"images-{index}", shard, resolution)
                   for index, shard in enumerate(shards)]
        counts = [future.result() for future in futures]
        best = min(best, time.perf_counter() - start)
        assert sum(count.ingested for count in counts) == len(paths), counts
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--j2k", type=int, default=2, help="JPEG 2000 lossless films for the J2K line (0: none)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp, \
            ProcessPoolExecutor(args.workers) as pool:
        folder = Path(tmp)
        # Other work on the machine shows here: with a load above the core count, the 2-process line suffers most.
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        start = time.perf_counter()
        paths = write_films(folder, args.images)
        print(f"{args.images} films {ROWS}x{COLUMNS} 12-bit uncompressed "
              f"({paths[0].stat().st_size / 1e6:.1f} MB each) written in {time.perf_counter() - start:.1f} s")
        for path in paths:  # into the page cache, so that no method pays the first read
            path.read_bytes()
        # Warm the workers: imports and the first Parquet write are paid once per process, not per shard.
        ingest(pool, args.workers, paths[:args.workers], 64, 1, True, folder)

        for resolution in (512, 128):
            decode = per_file(pydicom_decode, paths, resolution, args.repeats)
            rows = [
                ("pydicom decode alone (dcmread + pixel_array), 1 process", decode),
                ("naive: pydicom + float + PIL resize, 1 process", per_file(naive, paths, resolution, args.repeats)),
                ("load_dicom, 1 process", per_file(load, paths, resolution, args.repeats)),
                ("ingest_shard, 1 process, published SHA256",
                 ingest(pool, 1, paths, resolution, args.repeats, True, folder)),
                (f"ingest_shard, {args.workers} processes, published SHA256",
                 ingest(pool, args.workers, paths, resolution, args.repeats, True, folder)),
                (f"ingest_shard, {args.workers} processes, SHA256 computed",
                 ingest(pool, args.workers, paths, resolution, args.repeats, False, folder)),
            ]
            print(f"\nresolution {resolution}")
            for name, rate in rows:
                print(f"  {name:<58} {rate:7.1f} images/s   time x{decode / rate:4.2f} of pydicom decode")

        if args.j2k:
            j2k_folder = folder / "j2k"
            j2k_folder.mkdir()
            j2k = write_films(j2k_folder, args.j2k, JPEG2000Lossless)
            decode = per_file(pydicom_decode, j2k, 512, 1)
            print(f"\nJPEG 2000 lossless, {args.j2k} films, resolution 512")
            for name, rate in (("pydicom decode alone, 1 process", decode),
                               ("load_dicom, 1 process", per_file(load, j2k, 512, 1))):
                print(f"  {name:<58} {rate:7.2f} images/s   time x{decode / rate:4.2f} of pydicom decode")
        print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
