"""The demo's synthetic "shapes world": images of coloured shapes whose true captions are known.

Real weights and real web data cannot be fetched here, so the demo brings its own world. Every
image is one scene (one colour, one shape, one size, a count of 1-3 objects grouped at one
position, one background) with an exact templated caption, so prompt adherence can later be
read back from generated pixels (demo/adherence.py) the way GenEval does for real models.

The URL list also carries the web's usual noise, each kind planted on purpose and recorded in
its own column so that the curation stages can be checked against the truth:
- `caption_quality`: exact | vague ("a picture") | wrong (the caption of another scene);
- `duplicate_of`: near-duplicates of another row (resized, recompressed or shifted copies);
- `planted_defect`: truncated files, HTML saved as .jpg, and dead URLs that 404.

Held-out (colour, shape, count, position) combinations never appear in the training rows; the
rows with `is_heldout` carry them as evaluation prompts, in two disjoint sets (`heldout_set`):
- "tuning": combos fixed for every world (TUNING_SEED): any choice of steps, guidance or
  budget may look at these, and only at these;
- "test": combos drawn from the world's seed (one run seed, one test set): what the demo
  reports, never used to choose anything.
`train_urls.parquet` is the list to feed the pipeline; `urls.parquet` holds every row with
its ground truth.

Serve `out_dir` at `base_url`: each URL is `<base_url>/images/<file>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

# Hues are spread round the colour wheel and saturated, while backgrounds are neutral, so a
# pixel's chroma alone separates object from background and its hue names the colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 40),
    "green": (50, 170, 60),
    "cyan": (40, 190, 210),
    "blue": (40, 70, 220),
    "purple": (140, 50, 200),
    "pink": (230, 80, 170),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Object side as a fraction of the image side: 10 px and 17 px at 64 px, so three large
# objects still fit in a row with gaps the detector can see.
SIZES: dict[str, float] = {"small": 0.16, "large": 0.27}
POSITIONS = ("left", "right", "top", "bottom", "centre")
COUNTS = (1, 2, 3)
# Where a group's centre sits, in units of half the image side from the image centre.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (-0.5, 0.0),
    "right": (0.5, 0.0),
    "top": (0.0, -0.5),
    "bottom": (0.0, 0.5),
    "centre": (0.0, 0.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
VAGUE_CAPTIONS = (
    "image", "a picture", "clip art", "untitled", "geometric design", "simple shapes",
    "graphic", "thumbnail", "stock illustration", "IMG_{n:04d}.jpg", "photo {n}",
)
DUPLICATE_KINDS = ("resized", "recompressed", "shifted")
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges like real renders
# The tuning combos do not depend on the run seed, so settings chosen on them hold for every
# seed's test set; a seed only changes which other combos are tested (and held out).
TUNING_SEED = 20261202
HELDOUT_SETS = ("tuning", "test")


@dataclass
class WorldConfig:
    n_images: int = 1500
    n_heldout: int = 48  # test prompts
    n_tuning: int = 24  # tuning prompts
    image_size: int = 64
    colours: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
    backgrounds: tuple[str, ...] = ("white", "grey", "black")
    heldout_combos_per_colour: int = 4  # test combos
    tuning_combos_per_colour: int = 2
    vague_caption_fraction: float = 0.10
    wrong_caption_fraction: float = 0.07
    duplicate_fraction: float = 0.05
    broken_file_fraction: float = 0.02
    dead_url_fraction: float = 0.02
    png_fraction: float = 0.3
    jpeg_quality: int = 92
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.colours if c not in PALETTE]
        unknown += [b for b in self.backgrounds if b not in BACKGROUNDS]
        if unknown:
            raise ValueError(f"unknown colour/background {unknown}; allowed: "
                             f"{sorted(PALETTE)} / {sorted(BACKGROUNDS)}")
        if self.image_size < 32:
            raise ValueError(f"image_size {self.image_size} < 32 leaves no room for three shapes")


@dataclass(frozen=True)
class Scene:
    """What one image shows; its caption is a function of it."""

    colour: str
    shape: str
    size: str
    position: str
    count: int
    background: str

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return (f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun} "
                f"{POSITION_PHRASES[self.position]}, on a {self.background} background")


def object_boxes(scene: Scene, image_size: int, rng: np.random.Generator) -> list[tuple]:
    """(centre x, centre y, side) in pixels for each object of the scene's group."""
    side = SIZES[scene.size] * image_size * rng.uniform(0.94, 1.06)
    spacing = side + max(0.07 * image_size, 0.3 * side)
    half = image_size / 2
    jitter = 0.05 * image_size
    gx = half + POSITION_ANCHORS[scene.position][0] * half + rng.uniform(-jitter, jitter)
    gy = half + POSITION_ANCHORS[scene.position][1] * half + rng.uniform(-jitter, jitter)
    along_y = scene.position in ("left", "right")  # stack beside the edge it is named after
    offsets = [(i - (scene.count - 1) / 2) * spacing for i in range(scene.count)]
    centres = [(gx, gy + o) if along_y else (gx + o, gy) for o in offsets]
    # Pull the whole group inside the frame (1 px margin) without splitting it.
    xs, ys = [c[0] for c in centres], [c[1] for c in centres]
    dx = _inside_shift(min(xs) - side / 2, max(xs) + side / 2, image_size)
    dy = _inside_shift(min(ys) - side / 2, max(ys) + side / 2, image_size)
    return [(x + dx, y + dy, side) for x, y in centres]


def _inside_shift(low: float, high: float, limit: float, margin: float = 1.0) -> float:
    if low < margin:
        return margin - low
    if high > limit - margin:
        return limit - margin - high
    return 0.0


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image with slightly jittered colours."""
    background = _jitter(BACKGROUNDS[scene.background], 8, rng)
    colour = _jitter(PALETTE[scene.colour], 10, rng)
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    for cx, cy, side in object_boxes(scene, image_size, rng):
        x0, y0 = (cx - side / 2) * SUPERSAMPLE, (cy - side / 2) * SUPERSAMPLE
        x1, y1 = (cx + side / 2) * SUPERSAMPLE, (cy + side / 2) * SUPERSAMPLE
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:  # an upright isosceles triangle filling half its box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _jitter(rgb: tuple[int, int, int], amount: int, rng: np.random.Generator) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def tuning_combos(config: WorldConfig) -> set[tuple]:
    """(colour, shape, count, position) combos of the tuning prompts: the same in every world."""
    return _pick_combos(config, np.random.default_rng(TUNING_SEED),
                        config.tuning_combos_per_colour, exclude=set())


def seeded_test_combos(config: WorldConfig) -> set[tuple]:
    """The test prompts' combos, drawn from the world's seed among those not used for tuning."""
    return _pick_combos(config, np.random.default_rng([config.seed, 1]),
                        config.heldout_combos_per_colour, exclude=tuning_combos(config))


def heldout_combos(config: WorldConfig) -> set[tuple]:
    """Every combo kept out of training: the tuning and the test ones."""
    return tuning_combos(config) | seeded_test_combos(config)


def _pick_combos(config: WorldConfig, rng: np.random.Generator, per_colour: int,
                 exclude: set[tuple]) -> set[tuple]:
    others = [(s, n, p) for s in SHAPES for n in COUNTS for p in POSITIONS]
    combos = set()
    for colour in config.colours:
        free = [o for o in others if (colour, *o) not in exclude]
        picks = rng.choice(len(free), size=per_colour, replace=False)
        combos.update((colour, *free[i]) for i in sorted(picks))
    return combos


def _random_scene(config: WorldConfig, rng: np.random.Generator, combo: tuple | None = None):
    colour, shape, count, position = combo or (
        str(rng.choice(config.colours)), str(rng.choice(SHAPES)),
        int(rng.choice(COUNTS)), str(rng.choice(POSITIONS)))
    size = str(rng.choice(list(SIZES)))
    return Scene(colour, shape, size, position, count, str(rng.choice(config.backgrounds)))


def sample_scenes(config: WorldConfig, rng: np.random.Generator) -> list[tuple[Scene, str | None]]:
    """Training scenes (never a held-out combo; set None), then the test and tuning scenes
    cycling their combos."""
    held = heldout_combos(config)
    scenes: list[tuple[Scene, str | None]] = []
    while len(scenes) < config.n_images:
        scene = _random_scene(config, rng)
        if (scene.colour, scene.shape, scene.count, scene.position) not in held:
            scenes.append((scene, None))
    for name, combos, n in (("test", seeded_test_combos(config), config.n_heldout),
                            ("tuning", tuning_combos(config), config.n_tuning)):
        ordered = sorted(combos)
        scenes += [(_random_scene(config, rng, ordered[i % len(ordered)]), name) for i in range(n)]
    return scenes


def _alt_text(scene: Scene, quality: str, n: int, config: WorldConfig, rng) -> str:
    if quality == "vague":
        return str(rng.choice(VAGUE_CAPTIONS)).format(n=n)
    if quality == "wrong":  # another scene's exact caption: fluent, confident and false
        while True:
            other = _random_scene(config, rng)
            if other.colour != scene.colour and other.shape != scene.shape:
                return other.caption
    return scene.caption


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def near_duplicate(image: Image.Image, kind: str, background: tuple) -> tuple[bytes, str]:
    """A web-style copy of `image`: another resolution, a harsher JPEG, or a small shift."""
    if kind == "resized":
        side = int(image.width * 1.5)
        return encode_image(image.resize((side, side), Image.Resampling.BICUBIC), "png", 0), "png"
    if kind == "recompressed":
        return encode_image(image, "jpg", 35), "jpg"
    shifted = Image.new("RGB", image.size, background)
    shifted.paste(image, (2, 1))
    return encode_image(shifted, "jpg", 90), "jpg"


def _row(uid: str, scene: Scene, **extra) -> dict:
    row = {"id": uid, "url": None, "caption": scene.caption, "caption_quality": "exact",
           "true_caption": scene.caption, "is_heldout": False, "heldout_set": None,
           "duplicate_of": None,
           "duplicate_kind": "none", "planted_defect": "none", "file": None}
    row.update({f"true_{k}": v for k, v in dataclasses.asdict(scene).items()})
    row.update(extra)
    return row


def generate_world(config: WorldConfig, out_dir: str | Path, base_url: str) -> Path:
    """Write images under out_dir/images and the URL lists; return the path of urls.parquet."""
    out, images = Path(out_dir), Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    rows, originals = [], []
    for n, (scene, heldout) in enumerate(tqdm(sample_scenes(config, rng), desc="shapes world")):
        image = render_scene(scene, config.image_size, rng)
        fmt = "png" if rng.random() < config.png_fraction else "jpg"
        data = encode_image(image, fmt, config.jpeg_quality)
        row = _row(f"shape{n:06d}", scene, is_heldout=heldout is not None, heldout_set=heldout,
                   file=f"images/shape{n:06d}.{fmt}")
        if heldout is None:  # held-out rows are clean prompts for evaluation
            data = _plant_noise(row, scene, data, n, config, rng)
            originals.append((row, image))
        if data is not None:
            (out / row["file"]).write_bytes(data)
        rows.append(row)
    rows += _write_duplicates(originals, len(rows), config, rng, out)
    for row in rows:
        row["url"] = f"{base_url.rstrip('/')}/{row['file']}"
    table = pa.Table.from_pylist(rows, schema=_schema(rows))
    pq.write_table(table, out / "urls.parquet")
    pq.write_table(table.filter(pc.invert(table["is_heldout"])), out / "train_urls.parquet")
    _write_world_card(config, table, out)
    return out / "urls.parquet"


def _schema(rows: list[dict]) -> pa.Schema:
    """Inferred, except `heldout_set`, which is a string column even if every row is None."""
    inferred = pa.Table.from_pylist(rows).schema
    index = inferred.get_field_index("heldout_set")
    return inferred.set(index, pa.field("heldout_set", pa.string()))


def _plant_noise(row: dict, scene: Scene, data: bytes, n: int, config: WorldConfig, rng):
    """Maybe spoil the alt-text and the file; return the bytes to write (None: no file)."""
    draw = rng.random()
    if draw < config.vague_caption_fraction:
        row["caption_quality"] = "vague"
    elif draw < config.vague_caption_fraction + config.wrong_caption_fraction:
        row["caption_quality"] = "wrong"
    row["caption"] = _alt_text(scene, row["caption_quality"], n, config, rng)
    draw = rng.random()
    if draw < config.dead_url_fraction:
        row["planted_defect"] = "dead_url"
        return None
    if draw < config.dead_url_fraction + config.broken_file_fraction:
        if rng.random() < 0.5:
            row["planted_defect"] = "truncated"
            return data[: len(data) * 2 // 5]
        row["planted_defect"] = "html_as_image"
        row["file"] = row["file"].rsplit(".", 1)[0] + ".jpg"
        return b"<!DOCTYPE html><html><body><h1>Image not found</h1></body></html>\n"
    return data


def _write_duplicates(originals, first_index: int, config: WorldConfig, rng, out: Path):
    clean = [(r, im) for r, im in originals if r["planted_defect"] == "none"]
    count = min(len(clean), round(config.duplicate_fraction * config.n_images))
    rows = []
    for k, i in enumerate(sorted(rng.choice(len(clean), size=count, replace=False))):
        source, image = clean[i]
        kind = DUPLICATE_KINDS[k % len(DUPLICATE_KINDS)]
        data, fmt = near_duplicate(image, kind, BACKGROUNDS[source["true_background"]])
        uid = f"shape{first_index + k:06d}"
        scene = Scene(*(source[f"true_{f.name}"] for f in dataclasses.fields(Scene)))
        row = _row(uid, scene, caption=source["caption"], caption_quality=source["caption_quality"],
                   duplicate_of=source["id"], duplicate_kind=kind, file=f"images/{uid}.{fmt}")
        (out / row["file"]).write_bytes(data)
        rows.append(row)
    return rows


def _write_world_card(config: WorldConfig, table: pa.Table, out: Path) -> None:
    """world.json: the config and how much of each kind of noise was planted."""
    columns = ("caption_quality", "planted_defect", "duplicate_kind", "is_heldout")
    counts = {}
    for column in columns:
        values = table[column].to_pylist()
        counts[column] = {str(v): values.count(v) for v in sorted(set(values), key=str)}
    card = {"config": dataclasses.asdict(config), "rows": table.num_rows, "counts": counts,
            "palette": {c: PALETTE[c] for c in config.colours},
            "backgrounds": {b: BACKGROUNDS[b] for b in config.backgrounds},
            "shapes": SHAPES, "sizes": SIZES, "positions": POSITIONS, "counts_per_image": COUNTS,
            "tuning_seed": TUNING_SEED,
            "tuning_combos": sorted(tuning_combos(config)),
            "test_combos": sorted(seeded_test_combos(config)),
            "heldout_combos": sorted(heldout_combos(config))}
    (out / "world.json").write_text(json.dumps(card, indent=1) + "\n")


def read_scenes(urls_parquet: str | Path, heldout: bool | None = None,
                heldout_set: str | None = None) -> list[tuple[dict, Scene]]:
    """(row, true scene) for every row of a world's URL list, optionally only (non-)held-out
    rows or only one held-out set ("tuning" or "test")."""
    if heldout_set is not None and heldout_set not in HELDOUT_SETS:
        raise ValueError(f"heldout_set {heldout_set!r}: expected one of {HELDOUT_SETS}")
    rows = pq.read_table(urls_parquet).to_pylist()
    names = [f.name for f in dataclasses.fields(Scene)]
    return [(r, Scene(*(r[f"true_{n}"] for n in names))) for r in rows
            if (heldout is None or r["is_heldout"] == heldout)
            and (heldout_set is None or r.get("heldout_set") == heldout_set)]


def main(argv: list[str]) -> int:
    from pipeline.core.config import load_config, split_overrides, write_resolved_config

    parser = argparse.ArgumentParser(prog="rectiflow shapes-world", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for images/ and the URL lists")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="where out is served")
    parser.add_argument("--config", default=None, help="TOML preset with a [world] table")
    args, overrides = split_overrides(argv)
    parsed = parser.parse_args(args)
    sections = load_config({"world": WorldConfig}, parsed.config, overrides)
    path = generate_world(sections["world"], parsed.out, parsed.base_url)
    write_resolved_config(parsed.out, sections)
    print(path)
    return 0
