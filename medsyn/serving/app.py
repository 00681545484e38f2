"""The REST API (``/api/v1``), health, metrics and the web page of ``medsyn serve``.

Every refusal is a 4xx whose ``detail`` says what is wrong, naming the field where one is to blame; nothing a
client sends reaches a worker unchecked.

Authentication is decided once, when the app is made: with keys (any active key then), every ``/api/v1`` call,
``/metrics`` (except from this machine) and the API schema need one, for the life of the process, even after the
last key is revoked (every call is then refused, saying why); without keys the server listens on localhost only.
A key sees only its own jobs (another's answer 404, as if absent); an admin key, or localhost without keys, sees
all.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from sqlalchemy import text

from medsyn.schedulers.samplers import Sampler
from medsyn.serving.api_keys import RateLimiter, find_api_key, keys_configured
from medsyn.serving.database import ApiKey, Job, JobStatus, OutputFormat, as_utc
from medsyn.serving.service import MAX_SEED, GenerationService, JobRequest, RequestError

PAGE = Path(__file__).with_name("page.html")
MAX_WAIT_SECONDS = 30
MAX_GUIDANCE_SCALE = 100.0
"""Guidance beyond this gives no image (1e308 made a non-finite one); the API refuses it, naming the field."""
LOOPBACK_CLIENTS = {"127.0.0.1", "::1", "localhost"}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, max_length=64, description="a model name from GET /api/v1/models")
    class_label: StrictStr | StrictInt | None = Field(
        None, description="class name, or index as a number or ASCII digits (class-conditional models)")
    prompt: str | None = Field(None, min_length=1, description="the text prompt (MediSyn models)")
    negative_prompt: str | None = Field(None, min_length=1)
    n_samples: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i depends only on (seed, i)")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False)
    num_inference_steps: int | None = Field(None, ge=1)
    n_steps_each: int | None = Field(None, ge=1)
    sampler: Sampler = Sampler.LANGEVIN
    output_format: OutputFormat = OutputFormat.PNG
    quality_check: bool | None = Field(None, description="default: on where the server has the model's index")


class BodyChecks:
    """Before any route runs: a body over ``limit`` bytes gets 413 naming the limit, whether or not it says its
    length (a chunked one is read up to the limit, never further); a body that is not JSON by its content type
    gets 415 naming the expected type; one that is not UTF-8 gets 400 saying so."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(413, f"request body over this server's limit of {self.limit} bytes",
                                      scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, self._replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(413, f"request body over this server's limit of {self.limit} bytes",
                                          scope, receive, send)
        body = b"".join(chunks)
        if body:
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type != b"application/json":
                shown = content_type.decode("latin-1") or "none"
                return await self._refuse(415, f"send the body as application/json (content type was {shown})",
                                          scope, receive, send)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as error:
                return await self._refuse(400, f"the request body is not valid UTF-8 (byte {error.start})",
                                          scope, receive, send)
        return await self.app(scope, self._replay([{"type": "http.request", "body": body, "more_body": False}],
                                                  receive), send)

    @staticmethod
    def _replay(messages: list[dict], receive):
        async def replayed():
            return messages.pop(0) if messages else await receive()
        return replayed

    @staticmethod
    async def _refuse(status: int, detail: str, scope, receive, send):
        await JSONResponse({"detail": detail}, status)(scope, receive, send)


def _seconds(start, end) -> float | None:
    return None if start is None or end is None else round((as_utc(end) - as_utc(start)).total_seconds(), 3)


def job_view(job: Job, service: GenerationService, qa: list[dict] | None = None) -> dict:
    step = service.step_progress(job) if job.status == JobStatus.RUNNING else None
    view = {
        "id": job.id, "status": job.status, "model": job.model, "model_version": job.model_version,
        "class_label": job.class_name, "prompt": job.prompt, "negative_prompt": job.negative_prompt,
        "n_samples": job.n_samples, "seed": job.seed, "guidance_scale": job.guidance_scale,
        "num_inference_steps": job.num_inference_steps, "n_steps_each": job.n_steps_each, "sampler": job.sampler,
        "output_format": job.output_format, "quality_check": job.quality_check,
        "progress": {"images_done": job.generated, "n_samples": job.n_samples,
                     "fraction": round(job.generated / job.n_samples, 4), "current_batch_steps": step},
        "created_at": as_utc(job.created_at).isoformat(),
        "timings": {"queued_seconds": _seconds(job.created_at, job.started_at),
                    "running_seconds": _seconds(job.started_at, job.finished_at),
                    "total_seconds": _seconds(job.created_at, job.finished_at)},
        "qa": {"released": job.released, "withheld": job.withheld, "withheld_images": qa},
        "error": job.error,
        "links": {"self": f"/api/v1/jobs/{job.id}", "images": f"/api/v1/jobs/{job.id}/images"},
    }
    return view


class LongPollLimit:
    """At most ``limit`` long polls at once (each holds a connection, not a worker thread); 429 past it."""

    def __init__(self, limit: int):
        self.limit, self.active, self._lock = limit, 0, threading.Lock()

    def __enter__(self):
        with self._lock:
            if self.active >= self.limit:
                raise HTTPException(429, f"this server holds {self.limit} long polls already; poll without wait",
                                    headers={"Retry-After": "1"})
            self.active += 1

    def __exit__(self, *exc):
        with self._lock:
            self.active -= 1


def create_app(service: GenerationService, manage_workers: bool = True, require_keys: bool | None = None) -> FastAPI:
    """The app for ``service``; with ``manage_workers`` its workers start and stop with the app.

    ``require_keys``: whether calls need an API key, for the app's whole life; default: whether the database holds
    an active key now."""
    if require_keys is None:
        with service.sessions() as session:
            require_keys = keys_configured(session)

    @asynccontextmanager
    async def lifespan(_app):
        if manage_workers:
            service.start()
        yield
        if manage_workers:
            service.stop()

    schema_urls = {"docs_url": None, "redoc_url": None, "openapi_url": None} if require_keys else {}
    app = FastAPI(title="medsyn serve", version="1", lifespan=lifespan, **schema_urls)
    limiter = RateLimiter()
    long_polls = LongPollLimit(service.limits.max_long_polls)
    metrics = service.metrics

    @app.exception_handler(RequestError)
    async def refused(_request, error: RequestError):
        detail = ([{"loc": ["body", error.field], "msg": str(error), "type": "value_error"}] if error.field
                  else str(error))
        return JSONResponse({"detail": detail}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        """FastAPI's 422 without the offending input echoed (a NaN there broke the JSON answer into a 500)."""
        detail = []
        for problem in error.errors():
            field_name = ".".join(str(part) for part in problem["loc"][1:]) or "body"
            detail.append({"loc": list(problem["loc"]), "msg": f"{field_name}: {problem['msg']}",
                           "type": problem["type"]})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
        return response

    app.add_middleware(BodyChecks, limit=service.limits.max_body_bytes)

    def caller(request: Request) -> ApiKey | None:
        """The API key of the request when the server requires keys (401 without a valid one, 429 over its
        rate); None on a keyless (localhost-only) server."""
        if not require_keys:
            return None
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else \
            request.headers.get("x-api-key")
        if not key:
            raise HTTPException(401, "an API key is required: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        with service.sessions() as session:
            record = find_api_key(session, key)
            if record is None and not keys_configured(session):
                raise HTTPException(401, "this server requires an API key and none is active (every key is "
                                         "revoked); an operator creates one with 'medsyn serve --create-key NAME'",
                                    headers={"WWW-Authenticate": "Bearer"})
        if record is None:
            raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        wait = limiter.retry_after(record.id, record.requests_per_minute)
        if wait:
            raise HTTPException(429, f"rate limit of {record.requests_per_minute} requests a minute reached; retry "
                                     f"in {wait:.1f} s", headers={"Retry-After": str(int(wait) + 1)})
        return record

    def client_of(request: Request) -> str | None:
        return request.client.host if request.client else None

    def owned_job(job_id: str, key: ApiKey | None):
        """The job, if ``key`` may see it: its own, or any for an admin key or a keyless server; else 404, the
        same answer as for an id that does not exist, so that ids do not leak."""
        job = service.get_job(job_id)
        if key is not None and not key.admin and job.api_key_id != key.id:
            raise RequestError(None, f"no job {job_id!r}", status_code=404)
        return job

    def metrics_reader(request: Request) -> None:
        """With keys, metrics (model names, traffic) go to this machine's scraper or to a key holder."""
        if require_keys and client_of(request) not in LOOPBACK_CLIENTS:
            caller(request)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict:
        with service.sessions() as session:
            session.execute(text("SELECT 1"))
        alive = {name: worker.is_alive() for name, worker in service.workers.items()}
        return {"status": "ok" if all(alive.values()) else "degraded", "workers": alive}

    @app.get("/metrics")
    def prometheus(_reader: None = Depends(metrics_reader)) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/models")
    def models(_key: ApiKey | None = Depends(caller)) -> dict:
        return {"models": [model.summary() for model in service.models.values()],
                "limits": {"max_samples": service.limits.max_samples, "max_steps": service.limits.max_steps,
                           "max_prompt_characters": service.limits.max_prompt_characters}}

    @app.post("/api/v1/generate", status_code=202)
    def generate(body: GenerateRequest, request: Request, key: ApiKey | None = Depends(caller)) -> dict:
        job = service.submit(JobRequest(**body.model_dump()), api_key_id=None if key is None else key.id,
                             client=client_of(request), quota=None if key is None else key.images_per_day)
        return job_view(job, service)

    if require_keys:
        @app.get("/api/v1/openapi.json", include_in_schema=False)
        def schema(_key: ApiKey | None = Depends(caller)) -> dict:
            return get_openapi(title=app.title, version=app.version, routes=app.routes)

    @app.get("/api/v1/jobs/{job_id}")
    async def get_job(job_id: str, wait: float = Query(0, ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False),
                      key: ApiKey | None = Depends(caller)) -> dict:
        """The job's state; with ``wait``, once it has finished or after that many seconds (a long poll, which
        waits on the event loop and holds no worker thread)."""
        job = await run_in_threadpool(owned_job, job_id, key)
        if wait:
            with long_polls:
                job = await service.wait_for_job(job_id, wait)
        images = await run_in_threadpool(service.images, job_id)
        withheld = [{"index": image.index, "reason": image.qa_reason} for image in images if not image.released]
        return await run_in_threadpool(job_view, job, service, withheld)

    @app.delete("/api/v1/jobs/{job_id}")
    def cancel(job_id: str, request: Request, key: ApiKey | None = Depends(caller)) -> dict:
        owned_job(job_id, key)
        job = service.cancel(job_id, None if key is None else key.id, client_of(request))
        return job_view(job, service)

    @app.get("/api/v1/jobs/{job_id}/images")
    def all_images(job_id: str, request: Request, key: ApiKey | None = Depends(caller)) -> Response:
        """Every released image of a finished job: a zip (PNG or DICOM files and qa.json) or, for the npz
        format, one samples.npz in ``medsyn generate``'s layout."""
        job = owned_job(job_id, key)
        if job.status != JobStatus.DONE:
            raise RequestError(None, f"job {job_id} is {job.status}; its images are released once it is done",
                               status_code=409)
        images = service.images(job_id)
        released = [image for image in images if image.released]
        service.record_download(job, None if key is None else key.id, client_of(request), "all images")
        if job.output_format == OutputFormat.NPZ:
            from PIL import Image

            pixels = [np.asarray(Image.open(service.storage / image.path)) for image in released]
            buffer = io.BytesIO()
            model = service.models.get(job.model)
            np.savez_compressed(
                buffer, images=np.stack(pixels) if pixels else np.zeros((0,), np.uint8),
                indices=np.array([image.index for image in released], dtype=np.int64),
                labels=np.full(len(released), -1 if job.class_label is None else job.class_label, dtype=np.int64),
                class_names=np.array((model.class_names if model else None) or []),
                **({"captions": np.array([job.prompt] * len(released))} if job.prompt else {}),
            )
            return Response(buffer.getvalue(), media_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{job_id}.npz"'})
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for image in released:
                archive.write(service.storage / image.path, Path(image.path).name)
            archive.writestr("qa.json", json.dumps([
                {"index": image.index, "released": image.released, "reason": image.qa_reason,
                 "sha256": image.sha256, "nearest_training_distance": image.nearest_training_distance,
                 "file": None if image.path is None else Path(image.path).name} for image in images], indent=2))
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})

    @app.get("/api/v1/jobs/{job_id}/images/{index}")
    def one_image(job_id: str, index: int, request: Request, key: ApiKey | None = Depends(caller)) -> Response:
        job = owned_job(job_id, key)
        if not 0 <= index < job.n_samples:
            raise RequestError(None, f"job {job_id} has images 0-{job.n_samples - 1}, not {index}", 404)
        image = next((image for image in service.images(job_id) if image.index == index), None)
        if image is None:
            raise RequestError(None, f"image {index} of job {job_id} is not generated yet", status_code=409)
        if not image.released:
            raise RequestError(None, f"image {index} was withheld by the QA gate: {image.qa_reason}", 404)
        service.record_download(job, None if key is None else key.id, client_of(request), f"image {index}")
        dicom = image.path.endswith(".dcm")
        return Response((service.storage / image.path).read_bytes(),
                        media_type="application/dicom" if dicom else "image/png",
                        headers={"Content-Disposition": f'inline; filename="{Path(image.path).name}"'})

    return app
