"""``label_statistics``: label counts, label-set cardinality, top co-occurring pairs, split sizes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from mlc_ray.data.manifest.model import SPLITS, Manifest


@dataclass
class LabelStatistics:
    """Counts per label, label cardinality and the commonest label pairs of a manifest."""

    source: str
    num_images: int
    vocabulary: list[str]
    counts: dict[str, int]
    cardinality: float  # mean labels per image
    num_unlabeled: int
    top_pairs: list[tuple[tuple[str, str], int]]
    split_counts: dict[str, int]

    def format(self, max_pairs: int | None = None) -> str:
        """A plain-text table (the jobs log it)."""
        lines = [
            f"manifest {self.source}: {self.num_images} images, {len(self.vocabulary)} labels, "
            f"{self.cardinality:.2f} labels/image, {self.num_unlabeled} without labels",
        ]
        if self.split_counts:
            lines.append("splits: " + ", ".join(f"{k}={v}" for k, v in self.split_counts.items()))
        width = max([len("label"), *(len(x) for x in self.vocabulary)])
        lines.append(f"{'label':<{width}}  {'images':>7}  {'share':>6}")
        for label in self.vocabulary:
            c = self.counts[label]
            share = c / self.num_images if self.num_images else 0.0
            lines.append(f"{label:<{width}}  {c:>7d}  {share:>6.1%}")
        pairs = self.top_pairs if max_pairs is None else self.top_pairs[:max_pairs]
        if pairs:
            lines.append("top co-occurring pairs:")
            for (a, b), c in pairs:
                lines.append(f"  {a} + {b}: {c}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def label_statistics(manifest: Manifest, top_pairs: int = 10) -> LabelStatistics:
    targets = manifest.multi_hot().astype(np.int64)
    counts = targets.sum(axis=0) if len(manifest) else np.zeros(len(manifest.vocabulary), dtype=np.int64)
    per_image = targets.sum(axis=1)
    pairs: Counter[tuple[str, str]] = Counter()
    for labels in manifest.labels:
        pairs.update(combinations(labels, 2))  # labels are already in vocabulary order
    splits = Counter(s or "unset" for s in manifest.splits) if manifest.has_splits else Counter()
    index = {label: i for i, label in enumerate(manifest.vocabulary)}  # ties: vocabulary order
    return LabelStatistics(
        source=manifest.source,
        num_images=len(manifest),
        vocabulary=list(manifest.vocabulary),
        counts={label: int(c) for label, c in zip(manifest.vocabulary, counts, strict=True)},
        cardinality=float(per_image.mean()) if len(manifest) else 0.0,
        num_unlabeled=int((per_image == 0).sum()),
        top_pairs=sorted(pairs.items(), key=lambda kv: (-kv[1], index[kv[0][0]], index[kv[0][1]]))[
            :top_pairs
        ],
        split_counts={k: splits[k] for k in (*SPLITS, "unset") if splits.get(k)},
    )
