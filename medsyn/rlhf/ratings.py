"""Expert ratings of generated images: an append-only JSON-lines file that a kill cannot corrupt.

MINIM's experts rate each generated image 1 (poor), 2 or 3 (good), for its quality and for its match to the prompt;
medsyn keeps them normalised to [0, 1] for the selector and policy models. Every rating is one line, written with a
single ``write`` in append mode and flushed to disk, so a crash leaves at most one torn last line, which readers skip
(with a warning) and the next append starts after. Nothing is ever rewritten: undoing a rating appends a retraction
that names it, so the file stays an audit trail of who rated what, when.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path

import numpy as np

RATING_SCALE = (1, 2, 3)
#: Prompts longer than this are refused: a ratings file is not a place for documents.
MAX_PROMPT_CHARACTERS = 1000


class Aspect(StrEnum):
    QUALITY = "quality"
    PROMPT_MATCH = "prompt_match"


def image_digest(pixels: np.ndarray) -> str:
    """The content address of an image's uint8 pixels (H, W[, C]) and shape: ratings follow the image, not the file
    or folder it is stored in (a PNG and an NPZ copy of one image share it)."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"image_digest takes uint8 pixels, got {pixels.dtype}")
    return "sha256:" + hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def normalised(rating):
    """A 1-3 rating (a number, or a float tensor of them) on [0, 1]: 1 -> 0, 2 -> 0.5, 3 -> 1."""
    return (rating - RATING_SCALE[0]) / (RATING_SCALE[-1] - RATING_SCALE[0])


@dataclass(frozen=True)
class Rating:
    """One expert's rating of one generated image.

    Args:
        image: the image's content digest (``image_digest``).
        prompt: the prompt (or class) it was generated for.
        rating: 1, 2 or 3.
        rater: who rated it; raters are kept apart.
        aspect: ``quality`` or ``prompt_match``.
        path: where the image was when rated.
        model: the generator that made it.
        seed: the seed it was generated with.
        time: when it was rated (UTC, ISO 8601); default now.
        id: a unique id, so that a retraction can name it; default a fresh one.
    """

    image: str
    prompt: str
    rating: int
    rater: str
    aspect: Aspect = Aspect.QUALITY
    path: str | None = None
    model: str | None = None
    seed: int | None = None
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if isinstance(self.rating, bool) or self.rating not in RATING_SCALE:
            raise ValueError(f"rating must be one of {list(RATING_SCALE)}, got {self.rating!r}")
        try:
            object.__setattr__(self, "aspect", Aspect(self.aspect))
        except ValueError:
            raise ValueError(f"aspect must be one of {[a.value for a in Aspect]}, got {self.aspect!r}") from None
        if not self.rater or not str(self.rater).strip():
            raise ValueError("rater must name who rated the image")
        if not self.image.startswith("sha256:"):
            raise ValueError(f"image must be a content digest (sha256:...), got {self.image!r}")
        if len(self.prompt) > MAX_PROMPT_CHARACTERS:
            raise ValueError(f"prompt has {len(self.prompt)} characters; at most {MAX_PROMPT_CHARACTERS}")

    @property
    def score(self) -> float:
        """The rating on [0, 1]."""
        return normalised(self.rating)


class RatingsFile:
    """The append-only ratings file (JSON lines) at ``path``; created on the first append."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _append_line(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(descriptor).st_size
            if size and not self._ends_with_newline(size):
                line = "\n" + line  # a torn last line from a crash: start after it, leave it in place
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _ends_with_newline(self, size: int) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(size - 1)
            return handle.read(1) == b"\n"

    def append(self, rating: Rating) -> Rating:
        """Add ``rating`` (flushed to disk before this returns)."""
        self._append_line({"type": "rating", **asdict(rating)})
        return rating

    def retract(self, rating_id: str, rater: str) -> None:
        """Undo the rating ``rating_id`` (by appending a retraction; the rating's line stays)."""
        ratings = {r.id: r for r in self.ratings(include_retracted=True)}
        if rating_id not in ratings:
            raise ValueError(f"{self.path}: no rating with id {rating_id!r} to undo")
        if ratings[rating_id].rater != rater:
            raise ValueError(f"rating {rating_id!r} is {ratings[rating_id].rater!r}'s; {rater!r} cannot undo it")
        self._append_line({"type": "retraction", "id": rating_id, "rater": rater,
                           "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def ratings(self, rater: str | None = None, include_retracted: bool = False) -> list[Rating]:
        """The ratings in the order given (one rater's, or everyone's), without the retracted ones.

        A torn line (a crash mid-write) is skipped with a warning; any other bad line is an error naming it.
        """
        if not self.path.exists():
            return []
        records, torn = [], 0
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if self._is_torn(line):
                    torn += 1
                    continue
                raise ValueError(f"{self.path}: line {number} is not valid JSON ({error.msg})") from None
            records.append((number, record))
        if torn:
            warnings.warn(f"{self.path}: skipped {torn} torn line(s) left by an interrupted write", stacklevel=2)
        retracted = {record["id"] for _, record in records if record.get("type") == "retraction"}
        result = []
        for number, record in records:
            if record.get("type") != "rating":
                continue
            fields = {k: v for k, v in record.items() if k != "type"}
            try:
                rating = Rating(**fields)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{self.path}: line {number}: {error}") from None
            if (include_retracted or rating.id not in retracted) and (rater is None or rating.rater == rater):
                result.append(rating)
        return result

    @staticmethod
    def _is_torn(line: str) -> bool:
        """A line cut short by a crash: the start of a record, never closed."""
        return line.lstrip().startswith("{") and not line.rstrip().endswith("}")

    def rated_images(self, rater: str, aspect: Aspect | str = Aspect.QUALITY) -> set[str]:
        """Digests of the images ``rater`` has rated for ``aspect``: where a rater resumes."""
        return {r.image for r in self.ratings(rater) if r.aspect == Aspect(aspect)}
