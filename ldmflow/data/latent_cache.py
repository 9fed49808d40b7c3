"""The latent cache on disk: a dataset's VAE posteriors, encoded once and memory-mapped by every later run.

Holding the whole cache in each process's memory cost 3-6 GiB per process at 100k images (x8 per GPU node),
and every run encoded the dataset again. Here each cache is a folder named by its key's digest:

    <cache dir>/<digest>/index.json         written last: its presence means the shards are complete
                         params-00000.npy   (n, 2c, h, w) mean and log-variance of positions 0, P, 2P, ...
                         flipped-00000.npy  the same for the mirrored images (with --random_flip)
                         sources-00000.npy  (n,) the record each row was read from (an unreadable image is
                                            replaced by the next readable one, as in training)

Process p of P writes shard p (positions p, p + P, ...) into a staging folder; the main process checks the
shards, writes the index and renames the folder into place, holding a lock so that two runs never build one
key at once. Readers memory-map the shards, so the operating system's page cache holds them once per machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldmflow.errors import LdmflowError
from ldmflow.files import write_atomically

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
MAX_SHARDS = 4096  # processes that built one cache: more than any cluster's, far below a hang
_FORMAT = 1


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached numbers depend on; any change gives another cache."""

    vae_digest: str  # model_digest of the VAE folder: the same weights wherever they were downloaded to
    dataset_digest: str  # the manifest's bytes and its split's image files (Manifest.files_digest)
    resolution: int
    crop: str  # "center": one centred square crop per image, after resizing the shorter side
    flip: bool  # the mirrored images' posteriors are stored too
    dtype: str  # how the posteriors are stored (float32 or float16)
    preserve_input_precision: bool  # 16/32-bit images decoded at full precision or quantised to 8 bits

    @property
    def digest(self) -> str:
        text = json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CacheIndex:
    """index.json: the key, the layout and the byte size of every shard file."""

    key: CacheKey
    num_records: int
    num_shards: int
    row_shape: tuple[int, ...]  # (2c, h, w)
    files: dict[str, int]  # name -> bytes
    unreadable: tuple[str, ...]  # image paths replaced by a readable neighbour while encoding
    non_finite: tuple[str, ...] = ()  # image paths whose NaN or infinite pixels were read as 0 (1 for +inf)

    def to_json(self) -> bytes:
        return json.dumps({"format": _FORMAT, "digest": self.key.digest, "key": dataclasses.asdict(self.key),
                           "num_records": self.num_records, "num_shards": self.num_shards,
                           "row_shape": list(self.row_shape), "files": self.files,
                           "unreadable": list(self.unreadable), "non_finite": list(self.non_finite),
                           "written_by": socket.gethostname(),
                           "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1).encode()

    @classmethod
    def read(cls, folder: Path) -> CacheIndex:
        data = json.loads((folder / INDEX_FILE).read_bytes())
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return cls(CacheKey(**data["key"]), int(data["num_records"]), int(data["num_shards"]),
                   tuple(int(v) for v in data["row_shape"]), {str(k): int(v) for k, v in data["files"].items()},
                   tuple(data["unreadable"]), tuple(data.get("non_finite", ())))


def shard_rows(num_records: int, shard: int, num_shards: int) -> int:
    """How many positions shard `shard` holds: positions shard, shard + num_shards, ..."""
    return len(range(shard, num_records, num_shards))


def shard_files(shard: int, flip: bool) -> list[str]:
    names = [f"params-{shard:05d}.npy", f"sources-{shard:05d}.npy"]
    return names + [f"flipped-{shard:05d}.npy"] if flip else names


class LatentCache:
    """One key's cache folder under `root`: whether it is complete, building it, and reading it."""

    def __init__(self, root: str | Path, key: CacheKey):
        self.root, self.key = Path(root), key
        self.folder = self.root / key.digest

    def problem(self) -> str | None:
        """Why the published cache cannot be used ("absent", a wrong size, ...), or None when it is complete."""
        if not (self.folder / INDEX_FILE).is_file():
            return "absent"
        try:
            index = CacheIndex.read(self.folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"its index is unreadable ({type(error).__name__})"
        if index.key != self.key:
            return "its index belongs to another key"
        if not (1 <= index.num_shards <= MAX_SHARDS and 0 <= index.num_records and len(index.row_shape) == 3):
            return "its index describes an impossible layout"
        expected = {name for shard in range(index.num_shards) for name in shard_files(shard, self.key.flip)}
        if set(index.files) != expected:
            return "its index lists other files than the layout needs"
        for name, size in sorted(index.files.items()):
            path = self.folder / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                return f"{name} is {'missing' if actual is None else f'{actual} bytes, expected {size}'}"
            rows = shard_rows(index.num_records, int(name[-9:-4]), index.num_shards)
            shape, dtype = ((rows,), np.int64) if name.startswith("sources") else \
                ((rows, *index.row_shape), np.dtype(self.key.dtype))
            try:
                array = np.load(path, mmap_mode="r")  # reads the header only
            except Exception as error:  # noqa: BLE001 - numpy's header parser raises anything (SyntaxError, ...)
                return f"{name} is not a readable array ({type(error).__name__})"
            if array.shape != shape or array.dtype != dtype:
                return f"{name} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}"
        return None

    @contextlib.contextmanager
    def build_lock(self):
        """Held while building: a second run with the same key waits here, then finds the cache built. The OS
        releases it when the holder dies, so a killed builder never blocks the next run."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{self.key.digest}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("Waiting for another run that is building the latent cache %s ...", self.folder)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def staging_folder(self) -> Path:
        """A fresh folder to build in, beside the final one (same filesystem: the publishing rename is atomic).
        Called with the build lock held, so leftovers of killed builders of this key are removed first."""
        for stale in self.root.glob(f".{self.key.digest}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.root / f".{self.key.digest}.partial-{os.getpid()}-{int(time.time())}"
        staging.mkdir(parents=True)
        return staging

    def publish(self, staging: Path, num_records: int, num_shards: int, row_shape: tuple[int, ...]) -> None:
        """Check every shard, write the index last, and rename the folder into place (main process)."""
        files = {}
        for shard in range(num_shards):
            for name in shard_files(shard, self.key.flip):
                if not (staging / name).is_file():
                    raise LdmflowError(
                        f"The latent cache's shard {staging / name} was not written: is {self.root} a folder every "
                        "node shares? Set --latent_cache_dir (or LDMFLOW_CACHE) to a shared filesystem.")
                files[name] = (staging / name).stat().st_size
        unreadable, non_finite = ({path for shard in range(num_shards)
                                   for path in json.loads((staging / f"unreadable-{shard:05d}.json").read_text())[kind]}
                                  for kind in ("unreadable", "non_finite"))
        index = CacheIndex(self.key, num_records, num_shards, row_shape, files, tuple(sorted(unreadable)),
                           tuple(sorted(non_finite)))
        write_atomically(staging / INDEX_FILE, index.to_json())
        if self.folder.exists():  # a corrupt cache of the same key: nobody can be reading it
            broken = self.root / f".{self.key.digest}.broken-{os.getpid()}"
            self.folder.rename(broken)
            shutil.rmtree(broken, ignore_errors=True)
        staging.rename(self.folder)

    def open(self, flip_signs: torch.Tensor | None, records) -> CachedLatents:
        """The published cache as a dataset; `records` are the manifest's, for each row's conditions."""
        index = CacheIndex.read(self.folder)
        if index.num_records != len(records):
            raise LdmflowError(f"The latent cache {self.folder} holds {index.num_records} images, the manifest "
                               f"{len(records)}: remove the folder to rebuild it.")
        return CachedLatents(self.folder, index, records, flip_signs)


class ShardWriter:
    """Process p's part of a cache being built: rows appended in position order, straight into .npy files."""

    def __init__(self, staging: Path, shard: int, num_shards: int, num_records: int, row_shape: tuple[int, ...],
                 key: CacheKey):
        self.staging, self.shard, self.row = Path(staging), shard, 0
        self.positions = list(range(shard, num_records, num_shards))
        rows = len(self.positions)
        dtype = np.dtype(key.dtype)
        open_array = np.lib.format.open_memmap
        self.params = open_array(self.staging / f"params-{shard:05d}.npy", "w+", dtype, (rows, *row_shape))
        self.flipped = open_array(self.staging / f"flipped-{shard:05d}.npy", "w+", dtype,
                                  (rows, *row_shape)) if key.flip else None
        self.sources = np.zeros(rows, dtype=np.int64)
        self.unreadable: set[str] = set()
        self.non_finite: set[str] = set()

    def append(self, params: torch.Tensor, flipped: torch.Tensor | None, sources: list[int],
               unreadable: list[str], non_finite: list[str] = ()) -> None:
        """The next rows: (B, 2c, h, w) posteriors, their mirrored ones, the records they were read from."""
        end = self.row + len(params)
        self.params[self.row:end] = params.numpy()
        if self.flipped is not None:
            self.flipped[self.row:end] = flipped.numpy()
        self.sources[self.row:end] = sources
        self.unreadable.update(path for path in unreadable if path)
        self.non_finite.update(path for path in non_finite if path)
        self.row = end

    def close(self) -> None:
        if self.row != len(self.positions):
            raise LdmflowError(f"Latent cache shard {self.shard}: {self.row} rows written, {len(self.positions)} "
                               "expected.")
        for array in (self.params, self.flipped):
            if array is not None:
                array.flush()
        np.save(self.staging / f"sources-{self.shard:05d}.npy", self.sources)
        (self.staging / f"unreadable-{self.shard:05d}.json").write_text(json.dumps(
            {"unreadable": sorted(self.unreadable), "non_finite": sorted(self.non_finite)}))
        self.params = self.flipped = None


class CachedLatents(torch.utils.data.Dataset):
    """Training items from a published cache: posteriors read from memory-mapped shards, conditions from the
    manifest's records. The maps are opened lazily in each process (and DataLoader worker), never pickled."""

    def __init__(self, folder: Path, index: CacheIndex, records, flip_signs: torch.Tensor | None):
        self.folder, self.index, self.flip_signs = Path(folder), index, flip_signs
        sources = np.empty(index.num_records, dtype=np.int64)
        for shard in range(index.num_shards):
            sources[shard::index.num_shards] = np.load(self.folder / f"sources-{shard:05d}.npy")
        if len(sources) and (sources.min() < 0 or sources.max() >= len(records)):
            raise LdmflowError(f"The latent cache {folder} names records beyond the manifest's {len(records)}: "
                               "remove the folder to rebuild it.")
        self.sources = sources
        self.conditions = torch.from_numpy(np.stack([records[i].conditions for i in sources]))  # (N, D)
        self.present = torch.from_numpy(np.stack([records[i].present for i in sources]).astype(np.float32))
        self._maps: tuple[list, list] | None = None

    def __len__(self) -> int:
        return self.index.num_records

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # each worker maps the files itself (a pickled map is a copy)

    def _arrays(self) -> tuple[list, list]:
        if self._maps is None:
            load = lambda name: np.load(self.folder / name, mmap_mode="r")  # noqa: E731
            shards = range(self.index.num_shards)
            self._maps = ([load(f"params-{s:05d}.npy") for s in shards],
                          [load(f"flipped-{s:05d}.npy") for s in shards] if self.index.key.flip else [])
        return self._maps

    def rows(self, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (2c, h, w) posterior at `position` and its mirrored one, as float32 copies."""
        params, flipped = self._arrays()
        shard, row = position % self.index.num_shards, position // self.index.num_shards
        read = lambda maps: torch.from_numpy(np.array(maps[shard][row], dtype=np.float32))  # noqa: E731
        return read(params), read(flipped) if flipped else None

    def __getitem__(self, position: int) -> dict:
        params, flipped = self.rows(position)
        conditions = self.conditions[position]
        if flipped is not None and torch.rand(()) < 0.5:
            params, conditions = flipped, conditions * self.flip_signs
        return {"latent_parameters": params, "conditions": conditions, "present": self.present[position],
                "index": int(self.sources[position])}
