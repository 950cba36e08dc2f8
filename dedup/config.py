"""The `[dedup]` config section: which methods run, their thresholds, and the input columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SemanticMode = Literal["sd3", "multiprobe"]
RepresentativeBy = Literal["aesthetic", "clip", "resolution", "first"]


@dataclass
class DedupConfig:
    # Methods, run in this order; each sees only what the previous ones kept.
    exact: bool = True
    perceptual: bool = True
    semantic: bool = True

    # Perceptual: 64-bit pHash; two images are duplicates within this many differing bits.
    # 6 of 64 bits survives resizing, JPEG recompression and mild colour shifts while two
    # different photos typically differ in 20-40 bits.
    phash_max_distance: int = 6
    phash_index: Literal["flat", "multihash"] = "flat"  # multihash: for millions of images
    # pHash is colour-blind: a red and a blue circle at one place hash alike. With the colour
    # check, a pHash pair is a duplicate only if the cosine of the two images' colour-layout
    # descriptors (dedup/perceptual.py) is at least `colour_min_similarity`. Measured copies
    # score 0.87-1.0 (photos resized, recompressed at JPEG 25, tinted or white-balanced: >=
    # 0.95; the shapes world's 2 px shifted copies: >= 0.87) and the same shapes recoloured
    # at most 0.83; 0.85 sits in that gap. Rows whose pHash comes from a column, not from
    # image bytes, have no descriptor: their pairs are pHash-only.
    colour_check: bool = True
    colour_min_similarity: float = 0.85

    # Semantic: cosine similarity of L2-normalised embeddings. 0.95 suits CLIP image
    # embeddings (re-encodes and resizes land at 0.97-0.99, different photos of one scene
    # below 0.93); SD3 used 0.5 on SSCD copy-detection descriptors.
    semantic_mode: SemanticMode = "multiprobe"
    semantic_threshold: float = 0.95
    # None: sqrt(n) for sd3, 2 sqrt(n) for multiprobe (balances assignment against search).
    n_clusters: int | None = None
    kmeans_iterations: int = 10
    # k-means trains on a subsample of this many rows per centroid: fewer train faster but
    # give less even clusters and more rows near borders, which costs more in the search.
    kmeans_points_per_centroid: int = 32
    # multiprobe: k-means and assignment run in the top `routing_dim` principal directions
    # (None: the full space); a vector is also searched in each of its next `max_probes - 1`
    # nearest clusters whose border is within `probe_fraction` of the reach that guarantees
    # finding every pair (half the largest distance between two duplicates). 1.0 with
    # max_probes = n_clusters is exact; dedup/routing.py explains, docs/benchmarks.md measures.
    routing_dim: int | None = 128
    max_probes: int = 4
    probe_fraction: float = 0.15
    seed: int = 0

    # Which duplicate of a group is kept ("first": input order, as the paper did).
    representative_by: RepresentativeBy = "aesthetic"

    # Input columns (score and download stage contracts).
    uid_column: str = "uid"
    embedding_column: str = "score_image_embedding"
    sha256_column: str = "download_sha256"
    phash_column: str = "score_phash"
    image_column: str = "image"  # encoded bytes; used when a sha256 or pHash column is absent
    aesthetic_column: str = "score_aesthetic"
    clip_column: str = "score_clip"
    width_column: str = "score_width"
    height_column: str = "score_height"
    keep_column: str | None = None  # a boolean column: only rows where it is true take part

    # Threshold sweep (fraction removed per threshold, as in the paper's figure).
    sweep: bool = True
    sweep_thresholds: list[float] = field(
        default_factory=lambda: [0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
    )

    # Execution. "faiss": exact float32 range search. "bf16": a bfloat16 filter with exact
    # float32 recheck, same pairs; meant for CPUs with AMX, and slower than "faiss" on the
    # AVX512-BF16 machine of docs/benchmarks.md (dedup/kernels.py).
    search_kernel: Literal["faiss", "bf16"] = "faiss"
    backend: Literal["local", "ray"] = "local"
    max_task_mb: int = 256  # memory bound of one cluster-search task; larger clusters are split
    num_threads: int | None = None  # faiss OpenMP threads (None: faiss default)
    chunk_rows: int = 65536  # rows converted to float32 at a time

    def __post_init__(self):
        if not 0 <= self.phash_max_distance < 64:
            raise ValueError(f"phash_max_distance = {self.phash_max_distance} must be in [0, 63]")
        if not -1.0 <= self.colour_min_similarity <= 1.0:
            raise ValueError(
                f"colour_min_similarity = {self.colour_min_similarity} must be in [-1, 1]"
            )
        if not -1.0 <= self.semantic_threshold <= 1.0:
            raise ValueError(f"semantic_threshold = {self.semantic_threshold} must be in [-1, 1]")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters = {self.n_clusters} must be at least 1")
        if self.max_probes < 1:
            raise ValueError(f"max_probes = {self.max_probes} must be at least 1")
        if not 0 <= self.probe_fraction <= 1:
            raise ValueError(f"probe_fraction = {self.probe_fraction} must be in [0, 1]")
        if self.routing_dim is not None and self.routing_dim < 1:
            raise ValueError(f"routing_dim = {self.routing_dim} must be at least 1 (or unset)")
        if self.max_task_mb < 1 or self.chunk_rows < 1:
            raise ValueError("max_task_mb and chunk_rows must be positive")
        if any(not -1.0 <= t <= 1.0 for t in self.sweep_thresholds):
            raise ValueError(f"sweep_thresholds = {self.sweep_thresholds} must lie in [-1, 1]")
