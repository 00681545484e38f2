"""The generation service behind the REST API: jobs in the database, one worker thread per model.

A job is recorded before its id is returned. Each model's worker takes the oldest unfinished job, fills a batch
(up to ``max_batch`` images) round-robin from every unfinished job with the same sampling settings, generates it,
puts each image through the QA gate, writes the released ones to the storage folder (temporary name, then
rename) and records every image in one transaction. Image i of a job is drawn from (seed, i) alone, so a batch
abandoned by a cancellation or a crash is simply drawn again: a restart finds the unfinished jobs in the
database and completes them with the images an uninterrupted run would have given.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from medsyn.generation import ImageKey, ModelKind, SamplingSettings, check_sampling, sample_images, to_uint8
from medsyn.output_files import TEMPORARY_PREFIX, atomic_write, safe_file_stem
from medsyn.schedulers.samplers import Sampler
from medsyn.serving.database import (
    FINISHED,
    ApiKey,
    AuditEvent,
    Job,
    JobImage,
    JobStatus,
    OutputFormat,
    as_utc,
    utc_now,
)
from medsyn.serving.metrics import ServiceMetrics
from medsyn.serving.quality_gate import QAVerdict, sanity_verdicts
from medsyn.serving.served_model import ServedModel
from medsyn.synthetic_marking import DicomSeries, dicom_bytes, synthetic_description, write_png
from medsyn.validation import class_label_value

logger = logging.getLogger("medsyn.serve")
MAX_SEED = 2**31 - 1  # a 32-bit INTEGER column in every database


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for; the API answers 422 naming the field beyond these."""

    max_samples: int = 64
    max_steps: int = 1000
    max_batch: int = 16
    max_prompt_characters: int = 1000
    max_body_bytes: int = 64 * 1024
    batch_wait_seconds: float = 0.1
    max_long_polls: int = 256
    """Long polls (``GET /jobs/{id}?wait=``) held at once; more get 429."""
    """An idle worker woken by a request waits this long before it fills a batch, so that requests arriving
    together share one (a batch at a time is what the hardware is fast at)."""


class RequestError(ValueError):
    """A request the service refuses, with the field to blame (``None``: the request as a whole)."""

    def __init__(self, field_name: str | None, message: str, status_code: int = 422):
        super().__init__(message)
        self.field, self.status_code = field_name, status_code


class BatchAbandoned(Exception):
    """Raised between sampling steps when a job of the batch was cancelled or the service is stopping."""


@dataclass
class JobRequest:
    model: str
    class_label: int | str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    n_samples: int = 1
    seed: int | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    n_steps_each: int | None = None
    sampler: Sampler = Sampler.LANGEVIN
    output_format: OutputFormat = OutputFormat.PNG
    quality_check: bool | None = None


@dataclass
class _Work:
    """Images of one batch: (job, index) pairs sharing one sampling setting."""

    jobs: dict[str, Job]
    items: list[tuple[str, int]] = field(default_factory=list)


def settings_of(job: Job) -> SamplingSettings:
    return SamplingSettings(guidance_scale=job.guidance_scale, num_inference_steps=job.num_inference_steps,
                            n_steps_each=job.n_steps_each, sampler=Sampler(job.sampler))


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys can share a network batch."""
    return settings_of(job), job.class_label is None


def image_file_name(job: Job, index: int) -> str:
    """``medsyn generate``'s file name for image ``index`` (``.dcm`` for DICOM)."""
    label = job.prompt if job.prompt is not None else job.class_name if job.class_name is not None else "sample"
    suffix = "dcm" if job.output_format == OutputFormat.DICOM else "png"
    return f"{safe_file_stem(label)}_{job.seed}_{index:06d}.{suffix}"


class GenerationService:
    """Jobs, workers and storage for a set of served models."""

    def __init__(self, models: dict[str, ServedModel], sessions: sessionmaker, storage: str | Path,
                 limits: ServiceLimits = ServiceLimits(), metrics: ServiceMetrics | None = None):
        self.models, self.sessions, self.limits = models, sessions, limits
        self.storage = Path(storage)
        self.metrics = metrics or ServiceMetrics()
        self.workers: dict[str, ModelWorker] = {}
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()  # long polls, woken on changes
        self._waiters_lock = threading.Lock()
        for name, model in models.items():
            self.metrics.model_load_seconds.labels(name).set(model.load_seconds)

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover the queue from the database, then start one worker per model."""
        self.storage.mkdir(parents=True, exist_ok=True)
        for leftover in self.storage.rglob(f"{TEMPORARY_PREFIX}*"):
            leftover.unlink(missing_ok=True)  # a write that a crash interrupted; its image is drawn again
        with self.sessions() as session:
            unfinished = session.scalars(select(Job).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])))
            for job in unfinished:
                if job.model not in self.models:
                    self._finish(session, job, JobStatus.FAILED,
                                 f"model {job.model!r} is not served since the server restarted")
                elif job.model_version != self.models[job.model].version:
                    self._rebind_or_fail(session, job, self.models[job.model].version)
                elif job.status == JobStatus.RUNNING:
                    job.status = JobStatus.QUEUED
                    session.add(AuditEvent(action="resume", job_id=job.id, model=job.model,
                                           model_version=job.model_version,
                                           detail=f"requeued after a restart with {job.generated} of "
                                                  f"{job.n_samples} images done"))
            session.commit()
        for name, model in self.models.items():
            self.workers[name] = ModelWorker(self, model)
            self.workers[name].start()

    def _rebind_or_fail(self, session: Session, job: Job, version: str) -> None:
        """A job whose model changed version while the server was down: with no image made yet it moves to the new
        version (recorded); with some, it fails, since its images would mix two models."""
        if job.generated == 0:
            session.add(AuditEvent(action="rebind", job_id=job.id, model=job.model, model_version=version,
                                   detail=f"no image made yet; moved from version {job.model_version} to {version}"))
            job.model_version, job.status = version, JobStatus.QUEUED
            return
        self._finish(session, job, JobStatus.FAILED,
                     f"model {job.model!r} is now version {version}, but {job.generated} of this job's images came "
                     f"from version {job.model_version}; finishing it would mix two models: submit it again")

    def stop(self, timeout: float = 30.0) -> None:
        for worker in self.workers.values():
            worker.stopping.set()
            worker.wake.set()
        for worker in self.workers.values():
            worker.join(timeout)

    # -- requests ------------------------------------------------------------------------------------------------
    def submit(self, request: JobRequest, api_key_id: int | None = None, client: str | None = None,
               quota: int | None = None) -> Job:
        """Check ``request`` against the model and the limits, record it, wake the model's worker."""
        model = self.models.get(request.model)
        if model is None:
            raise RequestError("model", f"unknown model {request.model!r}; this server serves {sorted(self.models)}")
        limits = self.limits
        if request.n_samples > limits.max_samples:
            raise RequestError("n_samples", f"n_samples {request.n_samples} is over this server's limit of "
                                            f"{limits.max_samples}")
        for name in ("num_inference_steps", "n_steps_each"):
            value = getattr(request, name)
            if value is not None and value > limits.max_steps:
                raise RequestError(name, f"{name} {value} is over this server's limit of {limits.max_steps}")
        for name in ("prompt", "negative_prompt"):
            value = getattr(request, name)
            if value is not None and len(value) > limits.max_prompt_characters:
                raise RequestError(name, f"{name} has {len(value)} characters, over this server's limit of "
                                         f"{limits.max_prompt_characters}")
        if request.class_label is not None and request.prompt is not None:
            raise RequestError("class_label", "give class_label (class-conditional models) or prompt (MediSyn), "
                                              "not both")
        if request.negative_prompt is not None and model.kind is not ModelKind.MEDISYN:
            raise RequestError("negative_prompt", f"negative_prompt is for text-guided (MediSyn) models; model "
                                                  f"{model.name!r} is {model.kind.value}")
        if request.quality_check and model.gate is None:
            raise RequestError("quality_check", f"this server has no training index for model {model.name!r}, so "
                                                "it cannot run the QA gate; start it with --train-index")
        settings = SamplingSettings(request.guidance_scale, request.num_inference_steps, request.n_steps_each,
                                    Sampler(request.sampler))
        try:
            check_sampling(model.pipe, settings, prompt=request.prompt is not None,
                           negative_prompt=request.negative_prompt is not None)
        except ValueError as error:
            field_name = next((n for n in ("guidance_scale", "num_inference_steps", "n_steps_each", "sampler",
                                           "class_label", "prompt") if n in str(error)), None)
            raise RequestError(field_name, str(error)) from None
        class_label = class_name = None
        if request.class_label is not None:
            label = request.class_label
            if isinstance(label, str):
                label = class_label_value(label)
            try:
                class_label = int(model.pipe.encode_class_labels(label, 1)[0])
            except ValueError as error:
                raise RequestError("class_label", str(error)) from None
            class_name = model.class_names[class_label] if model.class_names else str(class_label)
        if model.kind is ModelKind.MEDISYN and request.negative_prompt is not None and (
                request.guidance_scale is not None and request.guidance_scale <= 1):
            raise RequestError("negative_prompt", "a negative prompt only acts under guidance_scale > 1")
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        with self.sessions() as session:
            if quota is not None:
                # Check and book in one transaction that first writes the key's row: a row lock on PostgreSQL, the
                # write lock on SQLite, so concurrent requests of one key are counted one after the other.
                session.execute(update(ApiKey).where(ApiKey.id == api_key_id).values(
                    images_per_day=ApiKey.images_per_day))
                since = utc_now() - datetime.timedelta(days=1)
                used = session.scalar(select(func.coalesce(func.sum(Job.n_samples), 0)).where(
                    Job.api_key_id == api_key_id, Job.created_at >= since))
                if used + request.n_samples > quota:
                    raise RequestError("n_samples", f"this key's quota is {quota} images a day; {used} used in the "
                                                    f"last 24 hours", status_code=429)
            job = Job(
                id=secrets.token_hex(16), status=JobStatus.QUEUED, model=model.name, model_version=model.version,
                class_label=class_label, class_name=class_name, prompt=request.prompt,
                negative_prompt=request.negative_prompt, n_samples=request.n_samples, seed=seed,
                guidance_scale=request.guidance_scale, num_inference_steps=request.num_inference_steps,
                n_steps_each=request.n_steps_each, sampler=Sampler(request.sampler).value,
                output_format=OutputFormat(request.output_format).value,
                quality_check=model.gate is not None if request.quality_check is None else request.quality_check,
                api_key_id=api_key_id, generated=0, released=0, withheld=0, created_at=utc_now(),
            )
            session.add(job)
            session.add(AuditEvent(action="generate", api_key_id=api_key_id, client=client, job_id=job.id,
                                   model=model.name, model_version=model.version,
                                   detail=f"{request.n_samples} images, seed {seed}, "
                                          f"{'prompt ' + repr(request.prompt[:80]) if request.prompt else class_name}"))
            session.commit()
        if model.name in self.workers:
            self.workers[model.name].wake.set()
        return job

    def get_job(self, job_id: str) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
        if job is None:
            raise RequestError(None, f"no job {job_id!r}", status_code=404)
        return job

    async def wait_for_job(self, job_id: str, timeout: float) -> Job:
        """The job once it has finished, or as it is after ``timeout`` seconds (a long poll: a client learns of
        the end at once without asking many times). It waits on the event loop, not in a worker thread, so many
        long polls do not starve the other routes."""
        from fastapi.concurrency import run_in_threadpool

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter = (loop, asyncio.Event())
            with self._waiters_lock:
                self._waiters.add(waiter)
            try:
                job = await run_in_threadpool(self.get_job, job_id)
                remaining = deadline - loop.time()
                if job.status in FINISHED or remaining <= 0:
                    return job
                try:
                    await asyncio.wait_for(waiter[1].wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
            finally:
                with self._waiters_lock:
                    self._waiters.discard(waiter)

    def _notify(self) -> None:
        """Wake every long poll (from any thread)."""
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed
                pass

    def cancel(self, job_id: str, api_key_id: int | None = None, client: str | None = None) -> Job:
        """Cancel a queued or running job, exactly once however many ask at the same time (one conditional
        update decides); the worker abandons its batch at the next step."""
        with self.sessions() as session:
            cancelled = session.execute(update(Job).where(
                Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
            ).values(status=JobStatus.CANCELLED, finished_at=utc_now()))
            job = session.get(Job, job_id)
            if job is None:
                raise RequestError(None, f"no job {job_id!r}", status_code=404)
            if cancelled.rowcount != 1:
                session.rollback()
                raise RequestError(None, f"job {job_id} is {job.status} already", status_code=409)
            session.refresh(job)
            self._observe_finish(job)
            session.add(AuditEvent(action="cancel", api_key_id=api_key_id, client=client, job_id=job.id,
                                   model=job.model, model_version=job.model_version))
            session.commit()
        self._notify()
        worker = self.workers.get(job.model)
        if worker is not None:
            worker.cancelled.add(job_id)
        return job

    def images(self, job_id: str) -> list[JobImage]:
        with self.sessions() as session:
            return list(session.scalars(select(JobImage).where(JobImage.job_id == job_id).order_by(JobImage.index)))

    def record_download(self, job: Job, api_key_id: int | None, client: str | None, what: str) -> None:
        with self.sessions() as session:
            session.add(AuditEvent(action="download", api_key_id=api_key_id, client=client, job_id=job.id,
                                   model=job.model, model_version=job.model_version, detail=what))
            session.commit()

    def step_progress(self, job: Job) -> float | None:
        """How far the batch now running for ``job`` is through its sampling steps (None when none is)."""
        worker = self.workers.get(job.model)
        return None if worker is None else worker.running_steps.get(job.id)

    # -- the worker's side ---------------------------------------------------------------------------------------
    def claim_batch(self, model: ServedModel) -> _Work | None:
        """The next batch for ``model``: the oldest unfinished job's settings, images round-robin over every
        unfinished job with those settings, at most ``max_batch``; the jobs are marked running."""
        with self.sessions() as session:
            jobs = list(session.scalars(select(Job).where(
                Job.model == model.name, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
            ).order_by(Job.created_at, Job.id)))
            self.metrics.queue_depth.labels(model.name).set(sum(j.n_samples - j.generated for j in jobs))
            if not jobs:
                return None
            key = batch_key(jobs[0])
            jobs = [job for job in jobs if batch_key(job) == key]
            done: dict[str, set[int]] = {job.id: set() for job in jobs}
            for job_id, index in session.execute(select(JobImage.job_id, JobImage.index).where(
                    JobImage.job_id.in_(list(done)))):
                done[job_id].add(index)
            pending = {job.id: [i for i in range(job.n_samples) if i not in done[job.id]] for job in jobs}
            work = _Work(jobs={job.id: job for job in jobs})
            while len(work.items) < self.limits.max_batch and any(pending.values()):
                for job in jobs:
                    if pending[job.id] and len(work.items) < self.limits.max_batch:
                        work.items.append((job.id, pending[job.id].pop(0)))
            for job_id in {job_id for job_id, _ in work.items}:
                job = work.jobs[job_id]
                if job.status == JobStatus.QUEUED:
                    job.status, job.started_at = JobStatus.RUNNING, job.started_at or utc_now()
            session.commit()
            return work

    def store_batch(self, model: ServedModel, work: _Work, images: np.ndarray, verdicts: Sequence[QAVerdict]) -> None:
        """Write the released images, then record every image and each job's counts in one transaction."""
        pixels = to_uint8(images)
        rows = []
        for (job_id, index), image, verdict in zip(work.items, pixels, verdicts, strict=True):
            job = work.jobs[job_id]
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            path = None
            if verdict.released:
                folder = self.storage / job_id
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / image_file_name(job, index)
                description = synthetic_description(f"{model.name}@{model.version}", job.seed, index)
                with atomic_write(path) as temporary:
                    if job.output_format == OutputFormat.DICOM:
                        series = DicomSeries.of_job(job.id, index, as_utc(job.created_at))
                        temporary.write_bytes(dicom_bytes(image, description, series))
                    else:
                        write_png(image, temporary, description)
            rows.append(JobImage(job_id=job_id, index=index, sha256=digest, released=verdict.released,
                                 path=None if path is None else str(path.relative_to(self.storage)),
                                 qa_reason=verdict.reason, created_at=utc_now(),
                                 nearest_training_distance=verdict.nearest_training_distance))
        with self.sessions() as session:
            statuses = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(list(work.jobs)))).all())
            rows = [row for row in rows if statuses.get(row.job_id) == JobStatus.RUNNING]  # not cancelled meanwhile
            session.add_all(rows)
            for job_id in {row.job_id for row in rows}:
                mine = [row for row in rows if row.job_id == job_id]
                released = sum(row.released for row in mine)
                session.execute(update(Job).where(Job.id == job_id).values(
                    generated=Job.generated + len(mine), released=Job.released + released,
                    withheld=Job.withheld + len(mine) - released))
            session.flush()
            for job_id in {row.job_id for row in rows}:
                job = session.get(Job, job_id)
                session.refresh(job)
                if job.generated >= job.n_samples:
                    self._finish(session, job, JobStatus.DONE, None)
            session.commit()
        self._notify()
        self.metrics.images_generated.labels(model.name).inc(len(rows))
        self.metrics.images_withheld.labels(model.name).inc(sum(not row.released for row in rows))

    def fail_batch(self, work: _Work, reason: str) -> None:
        with self.sessions() as session:
            for job_id in work.jobs:
                job = session.get(Job, job_id)
                if job is not None and job.status not in FINISHED and job_id in {j for j, _ in work.items}:
                    self._finish(session, job, JobStatus.FAILED, reason)
            session.commit()
        self._notify()

    def _finish(self, session: Session, job: Job, status: JobStatus, error: str | None) -> None:
        job.status, job.error, job.finished_at = status, error, utc_now()
        self._observe_finish(job)

    def _observe_finish(self, job: Job) -> None:
        waited = (as_utc(job.finished_at) - as_utc(job.created_at)).total_seconds()
        self.metrics.job_seconds.labels(job.model, JobStatus(job.status).value).observe(waited)


class ModelWorker(threading.Thread):
    """Generates one model's batches, one at a time, until stopped."""

    def __init__(self, service: GenerationService, model: ServedModel):
        super().__init__(name=f"medsyn-worker-{model.name}", daemon=True)
        self.service, self.model = service, model
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.cancelled: set[str] = set()
        self.running_steps: dict[str, float] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                work = self.service.claim_batch(self.model)
            except Exception:  # a database hiccup: log it, wait, try again rather than die
                logger.exception("claiming a batch for %s failed", self.model.name)
                work = None
            if work is None or not work.items:
                if self.wake.wait(0.5):
                    self.stopping.wait(self.service.limits.batch_wait_seconds)
                self.wake.clear()
                continue
            self.process(work)

    def process(self, work: _Work) -> None:
        job_ids = {job_id for job_id, _ in work.items}
        first = work.jobs[work.items[0][0]]
        keys = [ImageKey(work.jobs[j].seed, i, work.jobs[j].class_label, work.jobs[j].prompt,
                         work.jobs[j].negative_prompt) for j, i in work.items]

        def between_steps(pipe, step, timestep, tensors):
            if self.stopping.is_set() or job_ids & self.cancelled:
                raise BatchAbandoned
            done = (step + 1) / max(1, getattr(pipe, "num_timesteps", step + 1) or step + 1)
            self.running_steps.update(dict.fromkeys(job_ids, min(1.0, done)))
            return {}

        started = time.perf_counter()
        settings = settings_of(first)
        try:
            self.model.use_sampler(settings.sampler)
            images = sample_images(self.model.pipe, keys, settings, callback_on_step_end=between_steps)
            verdicts = sanity_verdicts(images)
            gated = [work.jobs[j].quality_check for j, _ in work.items]
            if self.model.gate is not None and any(gated):
                verdicts = [g if on else v for g, v, on in zip(self.model.gate.check(images), verdicts, gated)]
            self.service.store_batch(self.model, work, images, verdicts)
        except BatchAbandoned:
            logger.info("batch of %d images for %s abandoned (cancel or stop)", len(keys), self.model.name)
        except Exception as error:  # the model or the disk failed: the jobs say why, the worker goes on
            logger.exception("batch for %s failed", self.model.name)
            self.service.fail_batch(work, f"{type(error).__name__}: {error}")
        finally:
            for job_id in job_ids:
                self.running_steps.pop(job_id, None)
            self.cancelled -= job_ids
        self.service.metrics.batch_images.labels(self.model.name).observe(len(keys))
        logger.debug("batch of %d in %.2f s", len(keys), time.perf_counter() - started)
