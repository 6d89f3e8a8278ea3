"""Pre-warped person crops in Parquet shards: the JPEG decode is paid once, not every epoch.

Issue 9 (data path). Each training person is warped once from its image into a *source crop*
big enough that every augmented crop (docs/methods.md 1.1: half-body, scale x U(scale_range),
rotation up to +-rotation, flip) lies inside it, at the pixel density the zoomed-in end of the
scale range needs at ``data.input_size`` (capped at the image's own density). The crops and
their records (bbox, keypoints, ids) go into Parquet shards (pyarrow); :class:`ShardDataset`
then applies the same augmentation as the JPEG path from the shard.

How the two warps compose (so targets stay exact). The source crop is the affine
``A(x) = d * (x - o)`` of image pixels x (origin o (2,), density d; OpenCV centres, as in
transforms.py). An augmented crop is the affine M of image pixels (``CropParams.affine``). The
keypoints are mapped with M from the *original* image coordinates, stored in the shard as read,
so targets are bit-identical to the JPEG path's. Only the pixels come from the shard, warped
with ``M . A^-1`` (``x = u / d + o``), which is the same map from image to crop; the crop differs
from the JPEG path's only by the first interpolation (none when d = 1: o is then an integer and
the source crop is a pixel copy). CDKD's low-res view is warped from the same source.

Shards live in ``<data.root>/shards/<key>/`` (``$KDRAY_SHARD_DIR/<key>`` if set), key = hash of
the records, the image files' sizes and mtimes and the crop-relevant config fields; a finished
build (``manifest.json`` written last, under a file lock) is reused. Errors are
:class:`~kdray.data.coco.DataError` s naming the shard file and the field.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.data.coco import PersonRecord, fail, read_image
from kdray.data.dataset import PoseDataset
from kdray.data.keypoints import KeypointSpec
from kdray.data.transforms import box_to_center_scale, half_body

__all__ = ["ShardDataset", "build_shards", "shard_key", "source_crop", "train_dataset",
           "use_shards"]

VERSION = 1
ROWS_PER_FILE = 512
OVERSAMPLE = 1.0  # source density over the one the zoomed-in end of scale_range needs
AUTO_MIN_PERSONS = 1000
CROP_FIELDS = ("input_size", "padding", "scale_range", "rotation", "rotation_prob",
               "half_body_prob", "shard_codec")
SCHEMA = pa.schema([
    ("image_path", pa.string()), ("image_id", pa.int64()), ("ann_id", pa.int64()),
    ("score", pa.float64()), ("area", pa.float64()), ("bbox", pa.list_(pa.float32())),
    ("keypoints", pa.list_(pa.float32())),        # (K * 3,) x, y, v in image pixels
    ("origin", pa.list_(pa.float64())), ("density", pa.float64()),   # the source affine
    ("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.large_binary())])


class _Fixed:
    """An ``rng`` whose ``random()`` is constant: enumerates half_body's upper/lower choice."""
    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def source_crop(rec: PersonRecord, spec: KeypointSpec, data_cfg) -> tuple[np.ndarray, float,
                                                                          tuple[int, int]]:
    """Origin o (2,) float64, density d and (H, W) of the source crop covering every augmented
    crop of ``rec`` (the box and both half-body boxes, scaled by the largest factor, at any
    allowed rotation), plus a 2-pixel margin for the bilinear taps."""
    size = tuple(data_cfg.input_size)
    aspect = size[1] / size[0]
    cands = [box_to_center_scale(rec.bbox, aspect, data_cfg.padding)]
    if data_cfg.half_body_prob > 0:
        cands += [hb for u in (0.0, 0.99)
                  if (hb := half_body(rec.keypoints, spec, aspect, _Fixed(u))) is not None]
    lo, hi = data_cfg.scale_range
    rot = math.radians(data_cfg.rotation) if data_cfg.rotation_prob > 0 else 0.0
    mins, maxs, density = [], [], 0.0
    for center, scale in cands:
        w, h = float(scale[0]) * hi, float(scale[1]) * hi
        if rot >= math.pi / 2:
            ex = ey = 0.5 * math.hypot(w, h)
        else:  # w cos t + h sin t is increasing up to atan(h / w): its max on [0, rot]
            a, b = min(math.atan2(h, w), rot), min(math.atan2(w, h), rot)
            ex = 0.5 * (w * math.cos(a) + h * math.sin(a))
            ey = 0.5 * (w * math.sin(b) + h * math.cos(b))
        mins.append(np.asarray(center, np.float64) - (ex, ey))
        maxs.append(np.asarray(center, np.float64) + (ex, ey))
        density = max(density, size[1] / (float(scale[0]) * lo), size[0] / (float(scale[1]) * lo))
    d = min(1.0, OVERSAMPLE * density)
    margin = 2.0 / d
    lo_xy, hi_xy = np.min(mins, 0) - margin, np.max(maxs, 0) + margin
    if d == 1.0:
        lo_xy = np.floor(lo_xy)  # integer shift: the source crop is an exact pixel copy
    h_s, w_s = (int(math.ceil(v)) + 1 for v in (d * (hi_xy[1] - lo_xy[1]),
                                                 d * (hi_xy[0] - lo_xy[0])))
    return lo_xy, d, (h_s, w_s)


def source_affine(origin, density: float) -> np.ndarray:
    """(2, 3) image -> source-crop pixels, ``u = d * (x - o)``."""
    d = float(density)
    return np.array([[d, 0.0, -d * origin[0]], [0.0, d, -d * origin[1]]])


def shard_key(records: Sequence[PersonRecord], data_cfg) -> str:
    """Hash of the records, their image files (size, mtime) and the crop-relevant fields."""
    h = hashlib.sha256(json.dumps([VERSION, data_cfg.dataset] + [
        list(getattr(data_cfg, f)) if isinstance(getattr(data_cfg, f), tuple)
        else getattr(data_cfg, f) for f in CROP_FIELDS]).encode())
    stats: dict[str, tuple] = {}
    for r in records:
        if r.image_path not in stats:
            st = os.stat(r.image_path) if os.path.exists(r.image_path) else None
            stats[r.image_path] = (st.st_size, st.st_mtime_ns) if st else (-1, -1)
        h.update(f"{r.image_path}|{stats[r.image_path]}|{r.image_id}|{r.ann_id}|{r.score}|"
                 f"{r.area}".encode())
        h.update(np.ascontiguousarray(r.bbox, np.float32).tobytes())
        h.update(np.ascontiguousarray(r.keypoints, np.float32).tobytes())
    return h.hexdigest()[:16]


def shard_dir(records: Sequence[PersonRecord], data_cfg) -> Path:
    base = os.environ.get("KDRAY_SHARD_DIR") or str(Path(data_cfg.root) / "shards")
    return Path(base) / shard_key(records, data_cfg)


def _encode(crop: np.ndarray, codec: str) -> bytes:
    if codec == "raw":
        return crop.tobytes()
    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return buf.tobytes()


def _write_file(job: tuple) -> dict:
    """Warp one chunk of records into one Parquet file (runs in a build worker)."""
    path, records, spec, data_cfg = job
    cv2.setNumThreads(1)
    cols: dict[str, list] = {k: [] for k in SCHEMA.names}
    for r in records:
        origin, d, (h, w) = source_crop(r, spec, data_cfg)
        crop = cv2.warpAffine(read_image(r.image_path), source_affine(origin, d), (w, h),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)
        for k, v in (("image_path", str(r.image_path)), ("image_id", int(r.image_id)),
                     ("ann_id", int(r.ann_id)), ("score", float(r.score)),
                     ("area", float(r.area)), ("bbox", np.asarray(r.bbox, np.float32)),
                     ("keypoints", np.asarray(r.keypoints, np.float32).ravel()),
                     ("origin", origin.astype(np.float64)), ("density", d), ("height", h),
                     ("width", w), ("pixels", _encode(crop, data_cfg.shard_codec))):
            cols[k].append(v)
    table = pa.table({k: pa.array(v, type=SCHEMA.field(k).type) for k, v in cols.items()},
                     schema=SCHEMA)
    pq.write_table(table, path, compression="zstd" if data_cfg.shard_codec == "raw" else "none")
    return {"file": Path(path).name, "rows": len(records)}


def build_shards(records: Sequence[PersonRecord], spec: KeypointSpec, data_cfg,
                 out_dir: str | Path | None = None, workers: int = 1) -> Path:
    """Shards for ``records`` in ``out_dir`` (default :func:`shard_dir`); reused when a
    finished build exists. Concurrent callers (Ray workers) wait on a lock; one builds."""
    out = Path(out_dir) if out_dir is not None else shard_dir(records, data_cfg)
    if (out / "manifest.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "manifest.json").exists():
            return out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        jobs = [(str(tmp / f"shard-{i // ROWS_PER_FILE:05d}.parquet"),
                 list(records[i:i + ROWS_PER_FILE]), spec, data_cfg)
                for i in range(0, len(records), ROWS_PER_FILE)]
        import multiprocessing as mp
        # spawned workers cost ~3 s to start (imports): worth it from a few files on
        if workers > 1 and len(jobs) >= 4 and not mp.current_process().daemon:
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                files = pool.map(_write_file, jobs)
        else:
            files = [_write_file(j) for j in jobs]
        manifest = {"version": VERSION, "key": out.name, "rows": len(records),
                    "num_joints": spec.num_joints, "codec": data_cfg.shard_codec,
                    "crop_config": {f: getattr(data_cfg, f) for f in CROP_FIELDS},
                    "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(out, ignore_errors=True)  # an unfinished build without a manifest
        os.replace(tmp, out)
    return out


def use_shards(data_cfg, n_records: int) -> bool:
    return data_cfg.shards == "on" or (data_cfg.shards == "auto"
                                       and n_records >= AUTO_MIN_PERSONS)


def train_dataset(records: Sequence[PersonRecord], spec: KeypointSpec, data_cfg,
                  low_res_size=None, workers: int = 1, labelled: int = 0) -> PoseDataset:
    """The training dataset ``data.shards`` asks for: shard-backed or the JPEG path
    (``labelled``: see :class:`PoseDataset`)."""
    if not use_shards(data_cfg, len(records)):
        return PoseDataset(records, spec, data_cfg, train=True, low_res_size=low_res_size,
                           labelled=labelled)
    path = build_shards(records, spec, data_cfg, workers=max(workers, data_cfg.num_workers))
    return ShardDataset(path, spec, data_cfg, train=True, low_res_size=low_res_size,
                        labelled=labelled)


def _read_file(path: Path, num_joints: int) -> dict:
    """One shard file -> numpy columns + the pixels array; errors name the file and field."""
    if not path.exists():
        raise fail(path, "shard", "(file)", "listed in manifest.json but missing; delete the "
                   "shard folder to rebuild it")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise fail(path, "shard", "(file)", f"not a readable Parquet file ({e}); delete the "
                   f"shard folder to rebuild it") from None
    for f in SCHEMA:
        if f.name not in table.column_names:
            raise fail(path, "shard", f.name, "missing column")
        if table.schema.field(f.name).type != f.type:
            raise fail(path, "shard", f.name, f"expected {f.type}, got "
                       f"{table.schema.field(f.name).type}")
    cols = {k: table.column(k).combine_chunks() for k in SCHEMA.names}
    out = {k: cols[k].to_numpy(zero_copy_only=False)
           for k in ("image_id", "ann_id", "score", "area", "density", "height", "width")}
    out["image_path"] = cols["image_path"].to_pylist()
    for k, n in (("bbox", 4), ("keypoints", num_joints * 3), ("origin", 2)):
        flat = cols[k].flatten().to_numpy(zero_copy_only=False)
        if cols[k].null_count or len(flat) != n * len(table):
            raise fail(path, "shard", k, f"expected {n} values per row")
        out[k] = flat.reshape(len(table), n)
    out["keypoints"] = out["keypoints"].reshape(len(table), num_joints, 3)
    out["pixels"] = cols["pixels"]
    return out


class ShardDataset(PoseDataset):
    """:class:`PoseDataset` whose pixels come from shards (same items, same augmentation).

    The whole shard set is read into memory once (in the parent before loader workers fork,
    so they share it); ``load_source`` returns the source crop and its affine ``A``.
    """

    def __init__(self, path: str | Path, spec: KeypointSpec, data_cfg, train: bool = True,
                 **kwargs):
        path = Path(path)
        mf = path / "manifest.json"
        try:
            manifest = json.loads(mf.read_text())
            files = [(Path(path) / f["file"], int(f["rows"])) for f in manifest["files"]]
            codec, k = manifest["codec"], int(manifest["num_joints"])
        except FileNotFoundError:
            raise fail(mf, "shard", "(file)", "missing: the shard build did not finish") from None
        except (ValueError, KeyError, TypeError) as e:
            raise fail(mf, "manifest", str(e), "malformed manifest") from None
        if k != spec.num_joints:
            raise fail(mf, "manifest", "num_joints", f"{k}, expected {spec.num_joints}")
        parts = []
        for f, rows in files:
            part = _read_file(f, k)
            if len(part["density"]) != rows:
                raise fail(f, "shard", "(rows)", f"{len(part['density'])} rows, manifest "
                           f"says {rows}")
            parts.append(part)
        records = []
        self._pixels, self._where = [], []
        for j, part in enumerate(parts):
            self._pixels.append(part["pixels"])
            for i in range(len(part["density"])):
                self._where.append((j, i, part["origin"][i], float(part["density"][i]),
                                    int(part["height"][i]), int(part["width"][i])))
                records.append(PersonRecord(
                    part["image_path"][i], int(part["image_id"][i]), part["bbox"][i],
                    part["keypoints"][i], float(part["score"][i]), float(part["area"][i]),
                    int(part["ann_id"][i])))
        self.codec_name, self.path = codec, path
        super().__init__(records, spec, data_cfg, train, **kwargs)

    def load_source(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        j, i, origin, d, h, w = self._where[index]
        buf = np.frombuffer(self._pixels[j][i].as_buffer(), np.uint8)
        if self.codec_name == "raw":
            if buf.size != h * w * 3:
                raise fail(self.path, f"row {index}", "pixels", f"{buf.size} bytes, expected "
                           f"height * width * 3 = {h * w * 3}")
            img = buf.reshape(h, w, 3)
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if img is None:
                raise fail(self.path, f"row {index}", "pixels", "JPEG bytes do not decode")
        return img, source_affine(origin, d)
