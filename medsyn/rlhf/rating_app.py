"""``medsyn rate``: a small web page on localhost where experts rate generated images 1-3, one at a time.

Keys 1, 2, 3 (or the buttons) rate the image shown, S skips it, U undoes the rater's last rating and shows that
image again. Progress reads "n of N". Each rating is appended to the ratings file at once (``RatingsFile``), so a
reload, a crash or a new session resumes at the rater's first unrated image; several raters, each with their own id,
rate the same set without seeing each other's ratings.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from medsyn.rlhf.rating_images import ImageToRate
from medsyn.rlhf.ratings import Aspect, Rating, RatingsFile

PAGE = Path(__file__).with_name("rating_page.html")
#: A rater id: short, and safe to show and to put in a URL.
RATER_ID = dict(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")


class RatingRequest(BaseModel):
    rater: str = Field(**RATER_ID)
    aspect: Aspect = Aspect.QUALITY
    index: int = Field(ge=0)
    rating: Literal[1, 2, 3]


class UndoRequest(BaseModel):
    rater: str = Field(**RATER_ID)
    aspect: Aspect = Aspect.QUALITY


def create_rating_app(images: list[ImageToRate], ratings: RatingsFile, model: str | None = None) -> FastAPI:
    """The rating service for ``images``, writing to ``ratings``; ``model`` is recorded with each rating."""
    app = FastAPI(title="medsyn rate")
    index_of = {image.digest: i for i, image in enumerate(images)}
    lock = threading.Lock()  # one append or undo at a time, so the "already rated" check holds

    def rated(rater: str, aspect: Aspect) -> set[int]:
        return {index_of[d] for d in ratings.rated_images(rater, aspect) if d in index_of}

    def image(index: int) -> ImageToRate:
        if not 0 <= index < len(images):
            raise HTTPException(404, f"unknown image {index}: there are {len(images)}")
        return images[index]

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/next")
    def next_image(rater: str = Query(**RATER_ID), aspect: Aspect = Aspect.QUALITY, after: int = -1) -> dict:
        """The first image after ``after`` (wrapping round) that ``rater`` has not rated for ``aspect``."""
        done = rated(rater, aspect)
        order = [*range(after + 1, len(images)), *range(0, min(after + 1, len(images)))]
        index = next((i for i in order if i not in done), None)
        state = {"rated": len(done), "total": len(images), "done": index is None}
        if index is not None:
            state.update(index=index, prompt=images[index].prompt, source=images[index].source)
        return state

    @app.get("/api/images/{index}.png")
    def image_png(index: int) -> Response:
        return Response(image(index).png(), media_type="image/png")

    @app.post("/api/ratings", status_code=201)
    def rate(request: RatingRequest) -> dict:
        shown = image(request.index)
        with lock:
            done = rated(request.rater, request.aspect)
            if request.index in done:
                raise HTTPException(409, f"{request.rater} has already rated image {request.index} "
                                         f"for {request.aspect.value}; undo it first")
            saved = ratings.append(Rating(image=shown.digest, prompt=shown.prompt, rating=request.rating,
                                          rater=request.rater, aspect=request.aspect, path=shown.source, model=model))
        return {"id": saved.id, "rated": len(done) + 1, "total": len(images)}

    @app.post("/api/undo")
    def undo(request: UndoRequest) -> dict:
        with lock:
            mine = [r for r in ratings.ratings(request.rater) if r.aspect == request.aspect]
            if not mine:
                raise HTTPException(409, f"{request.rater} has no rating to undo")
            ratings.retract(mine[-1].id, request.rater)
        return {"index": index_of.get(mine[-1].image), "rating": mine[-1].rating}

    return app
