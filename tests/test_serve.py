"""``medsyn serve``: the API contract on SQLite and PostgreSQL, the CLI's images, batching, the QA gate, DICOM,
cancellation, restart recovery (kill -9 included), API keys and limits, and the web page in headless Chromium."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medsyn.cli import main
from medsyn.data import SimulatedBrainMRI
from medsyn.generation import ImageKey, SamplingSettings, sample_images
from medsyn.serving.app import create_app
from medsyn.serving.database import Base, open_database
from medsyn.serving.quality_gate import QAVerdict, QualityGate
from medsyn.serving.served_model import ServedModel
from medsyn.serving.service import GenerationService, JobRequest, ServiceLimits

from .browser import free_port, launch_chromium, needs_chromium, served
from .conftest import get_dummy_pipeline
from .serving_fixtures import postgres_cluster, wait_for_job  # noqa: F401 (a fixture)

LIMITS = ServiceLimits(max_samples=16, max_steps=400, max_batch=4, max_prompt_characters=200,
                       max_body_bytes=4096)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "model"
    get_dummy_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite")
    return request.getfixturevalue("postgres_cluster").new_database()


def make_service(model_dir, database, storage, gate=None, limits=LIMITS) -> GenerationService:
    model = ServedModel.load("brain", str(model_dir), gate=gate)
    return GenerationService({"brain": model}, open_database(database), storage, limits)


@pytest.fixture
def client(model_dir, database, tmp_path):
    with TestClient(create_app(make_service(model_dir, database, tmp_path / "storage"))) as test_client:
        yield test_client


def cli_images(model_dir, out, label: str, seed: int, count: int) -> dict[str, np.ndarray]:
    assert main(["generate", "--model", str(model_dir), "--class-label", label, "--num-images", str(count),
                 "--seed", str(seed), "--output-dir", str(out), "--batch-size", "2"]) == 0
    return {path.name: np.asarray(Image.open(path), dtype=int) for path in sorted(out.glob("*.png"))}


def zip_images(response) -> tuple[dict[str, np.ndarray], list[dict]]:
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        images = {name: np.asarray(Image.open(io.BytesIO(archive.read(name))), dtype=int)
                  for name in archive.namelist() if name.endswith(".png")}
        return images, json.loads(archive.read("qa.json"))


def test_a_medisyn_model_is_served_by_prompt_with_the_clis_images(tmp_path):
    from .conftest import get_dummy_medisyn_pipeline

    get_dummy_medisyn_pipeline().save_pretrained(tmp_path / "medisyn")
    model = ServedModel.load("text", str(tmp_path / "medisyn"))
    assert model.kind == "medisyn" and model.image_shape == (16, 16, 1) and model.class_names is None
    service = GenerationService({"text": model}, open_database(str(tmp_path / "db.sqlite")), tmp_path / "s", LIMITS)
    prompt = "axial T1 brain MRI, healthy"
    with TestClient(create_app(service)) as client:
        assert client.post("/api/v1/generate", json={"model": "text", "class_label": "healthy"}).status_code == 422
        guided = {"model": "text", "prompt": prompt, "negative_prompt": "fundus", "guidance_scale": 1.0}
        refused = client.post("/api/v1/generate", json=guided)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "negative_prompt"
        job_id = client.post("/api/v1/generate", json={"model": "text", "prompt": prompt, "n_samples": 3, "seed": 5,
                                                       "num_inference_steps": 2}).json()["id"]
        assert wait_for_job(client, job_id)["status"] == "done"
        images, _ = zip_images(client.get(f"/api/v1/jobs/{job_id}/images"))
    assert main(["generate", "--model", str(tmp_path / "medisyn"), "--prompt", prompt, "--num-inference-steps", "2",
                 "--num-images", "3", "--seed", "5", "--output-dir", str(tmp_path / "cli")]) == 0
    assert sorted(images) == [f"axial_T1_brain_MRI_healthy_5_{i:06d}.png" for i in range(3)]
    for name, image in images.items():
        assert np.abs(image - np.asarray(Image.open(tmp_path / "cli" / name), dtype=int)).max() <= 1


def test_the_model_version_follows_the_weights_and_names(model_dir, tmp_path):
    import torch

    from medsyn.serving.served_model import model_version

    pipe = get_dummy_pipeline()
    assert model_version(pipe) == ServedModel.load("brain", str(model_dir)).version  # saved and loaded: the same
    renamed = get_dummy_pipeline()
    renamed.register_class_names(["normal", "glioma"])
    assert model_version(renamed) != model_version(pipe)
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] += 1e-3
    assert model_version(pipe) != model_version(get_dummy_pipeline())


def test_the_schema_is_the_migration_on_both_databases(database):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    sessions = open_database(database)
    open_database(database)  # a second start finds the schema current and changes nothing
    with sessions.kw["bind"].connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_api_contract_and_the_clis_images(client, model_dir, tmp_path):
    models = client.get("/api/v1/models").json()["models"]
    assert [(m["name"], m["kind"], m["class_names"], m["image_shape"]) for m in models] == [
        ("brain", "score", ["healthy", "tumor"], [16, 16, 1])]
    reply = client.post("/api/v1/generate", json={"model": "brain", "class_label": "tumor", "n_samples": 5, "seed": 3})
    assert reply.status_code == 202 and reply.json()["status"] == "queued"
    other = client.post("/api/v1/generate", json={"model": "brain", "class_label": 0, "n_samples": 3, "seed": 7})
    assert client.get(f"/api/v1/jobs/{reply.json()['id']}?wait=31").status_code == 422  # long polls: 30 s at most
    job = client.get(f"/api/v1/jobs/{reply.json()['id']}?wait=30").json()  # a long poll: answers once done
    assert job["status"] == "done" and job["progress"]["images_done"] == 5 and job["qa"]["released"] == 5
    assert job["class_label"] == "tumor" and job["timings"]["total_seconds"] >= job["timings"]["running_seconds"]
    assert job["quality_check"] is False  # no training index: only the sanity checks ran

    # The same images as `medsyn generate` for the same seed, whatever batches the worker formed
    images, qa = zip_images(client.get(f"/api/v1/jobs/{job['id']}/images"))
    expected = cli_images(model_dir, tmp_path / "cli", "tumor", 3, 5)
    assert sorted(images) == sorted(expected) == [f"tumor_3_{i:06d}.png" for i in range(5)]
    for name in expected:
        assert np.abs(images[name] - expected[name]).max() <= 1
    assert [entry["index"] for entry in qa] == list(range(5)) and all(entry["released"] for entry in qa)
    healthy = wait_for_job(client, other.json()["id"])
    one = client.get(f"/api/v1/jobs/{healthy['id']}/images/2")
    assert one.headers["content-type"] == "image/png"
    expected = cli_images(model_dir, tmp_path / "cli-healthy", "healthy", 7, 3)
    assert np.abs(np.asarray(Image.open(io.BytesIO(one.content)), dtype=int) - expected["healthy_7_000002.png"]
                  ).max() <= 1
    assert "not an image of any patient" in Image.open(io.BytesIO(one.content)).text["Description"]

    # Errors name what is wrong
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}/images/5").status_code == 404
    assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 409  # done already
    assert client.get("/healthz").json() == {"status": "ok", "workers": {"brain": True}}
    metrics = client.get("/metrics").text
    assert 'medsyn_images_generated_total{model="brain"} 8.0' in metrics
    assert 'medsyn_requests_total{method="POST",route="/api/v1/generate",status="202"} 2.0' in metrics
    assert 'medsyn_job_seconds_count{model="brain",status="done"} 2.0' in metrics


@pytest.mark.parametrize(("body", "status", "field", "message"), [
    ({"model": "lung"}, 422, "model", "unknown model 'lung'"),
    ({"model": "brain", "class_label": "glioma"}, 422, "class_label", "unknown class label 'glioma'"),
    ({"model": "brain", "class_label": 7}, 422, "class_label", "out of range"),
    ({"model": "brain", "n_samples": 17}, 422, "n_samples", "over this server's limit of 16"),
    ({"model": "brain", "n_samples": 0}, 422, "n_samples", "greater than or equal to 1"),
    ({"model": "brain", "n_steps_each": 401}, 422, "n_steps_each", "limit of 400"),
    ({"model": "brain", "prompt": "x" * 201}, 422, "prompt", "201 characters"),
    ({"model": "brain", "prompt": "a brain"}, 422, "class_label", "pass class_label, not prompt"),
    ({"model": "brain", "sampler": "euler"}, 422, "sampler", "Input should be"),
    ({"model": "brain", "output_format": "jpeg"}, 422, "output_format", "Input should be"),
    ({"model": "brain", "quality_check": True}, 422, "quality_check", "no training index"),
    ({"model": "brain", "colour": "red"}, 422, "colour", "Extra inputs are not permitted"),
    ({"model": "brain", "seed": -1}, 422, "seed", "greater than or equal to 0"),
])
def test_bad_requests_get_a_4xx_naming_the_field(model_dir, tmp_path, body, status, field, message):
    with TestClient(create_app(make_service(model_dir, str(tmp_path / "db.sqlite"), tmp_path / "s"),
                               manage_workers=False)) as client:
        reply = client.post("/api/v1/generate", json=body)
    assert reply.status_code == status
    detail = reply.json()["detail"]
    assert detail[0]["loc"][-1] == field and message in detail[0]["msg"], detail


def test_nan_guidance_and_huge_bodies_are_refused_not_crashed_on(model_dir, tmp_path):
    service = make_service(model_dir, str(tmp_path / "db.sqlite"), tmp_path / "s")
    with TestClient(create_app(service, manage_workers=False)) as client:
        nan = client.post("/api/v1/generate", content='{"model": "brain", "guidance_scale": NaN}',
                          headers={"content-type": "application/json"})
        assert nan.status_code == 422 and "guidance_scale: Input should be a finite number" in nan.text
        huge = client.post("/api/v1/generate", content=json.dumps({"model": "brain", "prompt": "x" * 5000}),
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413 and "4096 bytes" in huge.text
        assert client.post("/api/v1/generate", content="{not json", headers={"content-type": "application/json"}
                           ).status_code == 422


def test_jobs_switch_samplers_and_back_with_the_clis_images(model_dir, tmp_path):
    service = make_service(model_dir, str(tmp_path / "db.sqlite"), tmp_path / "s")
    jobs = [("edm-heun", ["--sampler", "edm-heun", "--num-inference-steps", "3"]), ("langevin", [])]
    with TestClient(create_app(service)) as client:
        ids = []
        for sampler, _ in jobs:
            extra = {"num_inference_steps": 3} if sampler != "langevin" else {}
            ids.append(client.post("/api/v1/generate", json={"model": "brain", "class_label": "tumor", "n_samples": 2,
                                                             "seed": 1, "sampler": sampler, **extra}).json()["id"])
        served = [zip_images(client.get(f"/api/v1/jobs/{wait_for_job(client, i)['id']}/images"))[0] for i in ids]
    for (sampler, flags), images in zip(jobs, served, strict=True):
        out = tmp_path / sampler
        assert main(["generate", "--model", str(model_dir), "--class-label", "tumor", "--num-images", "2",
                     "--seed", "1", "--output-dir", str(out), *flags]) == 0
        for name, image in images.items():
            assert np.abs(image - np.asarray(Image.open(out / name), dtype=int)).max() <= 1, sampler
    assert not np.array_equal(served[0]["tumor_1_000000.png"], served[1]["tumor_1_000000.png"])


def test_compatible_jobs_share_a_batch_round_robin(model_dir, database, tmp_path):
    service = make_service(model_dir, database, tmp_path / "s")
    first = service.submit(JobRequest("brain", class_label="tumor", n_samples=3, seed=1))
    service.submit(JobRequest("brain", class_label="healthy", n_samples=2, guidance_scale=2.0))  # other settings
    third = service.submit(JobRequest("brain", class_label="healthy", n_samples=3, seed=2))
    work = service.claim_batch(service.models["brain"])
    assert work.items == [(first.id, 0), (third.id, 0), (first.id, 1), (third.id, 1)]  # max_batch 4
    assert service.get_job(first.id).status == "running"


def test_cancellation_stops_a_running_job_between_steps(model_dir, database, tmp_path):
    service = make_service(model_dir, database, tmp_path / "s")
    with TestClient(create_app(service)) as client:
        slow = {"model": "brain", "class_label": "tumor", "n_samples": 16, "n_steps_each": 400}
        job_id = client.post("/api/v1/generate", json=slow).json()["id"]
        wait_for_job(client, job_id, until=lambda job: job["progress"]["current_batch_steps"] is not None)
        cancelled = client.delete(f"/api/v1/jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        quick = client.post("/api/v1/generate", json={"model": "brain", "n_samples": 1}).json()["id"]
        assert wait_for_job(client, quick, timeout=30)["status"] == "done"  # the worker moved on
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["progress"]["images_done"] < 16
        assert client.get(f"/api/v1/jobs/{job_id}/images").status_code == 409


def generated_images(model_dir, label: int, seed: int, count: int) -> np.ndarray:
    pipe = get_dummy_pipeline()
    return sample_images(pipe, [ImageKey(seed, i, class_label=label) for i in range(count)], SamplingSettings())


def test_the_qa_gate_withholds_a_planted_copy_of_a_training_image(model_dir, database, tmp_path):
    planted = generated_images(model_dir, 1, 5, 3)[1]  # image 1 of the job below, put in the training set
    train = np.concatenate([generated_images(model_dir, 0, 1000, 24), planted[None]])
    np.savez(tmp_path / "train.npz", images=np.round(train[..., 0] * 255).astype(np.uint8))
    gate = QualityGate.from_image_sets(str(tmp_path / "train.npz"))
    with TestClient(create_app(make_service(model_dir, database, tmp_path / "s", gate))) as client:
        assert client.get("/api/v1/models").json()["models"][0]["quality_index"] is True
        job_id = client.post("/api/v1/generate", json={"model": "brain", "class_label": "tumor", "n_samples": 3,
                                                       "seed": 5}).json()["id"]
        job = wait_for_job(client, job_id)
        assert job["quality_check"] is True and (job["qa"]["released"], job["qa"]["withheld"]) == (2, 1)
        [withheld] = job["qa"]["withheld_images"]
        assert withheld["index"] == 1 and withheld["reason"].startswith("near-copy of training image 24")
        refused = client.get(f"/api/v1/jobs/{job_id}/images/1")
        assert refused.status_code == 404 and "withheld by the QA gate" in refused.json()["detail"]
        images, qa = zip_images(client.get(f"/api/v1/jobs/{job_id}/images"))
        assert sorted(images) == ["tumor_5_000000.png", "tumor_5_000002.png"]
        assert qa[1]["released"] is False and qa[1]["file"] is None
    assert not list((tmp_path / "s" / job_id).glob("*000001*"))  # the copy's pixels were never stored


def test_the_gate_checks_each_image_on_its_own():
    rng = np.random.default_rng(0)
    train = rng.uniform(0.2, 0.8, (30, 8, 8, 1))
    gate = QualityGate(train, threshold=0.05)
    fresh = rng.uniform(0.2, 0.8, (1, 8, 8, 1))
    nan = fresh.copy()
    nan[0, 0, 0, 0] = np.nan
    near = np.clip(np.round(train[3:4] * 255) / 255 + 0.02 * rng.standard_normal((1, 8, 8, 1)), 0, 1)
    verdicts = gate.check(np.concatenate([fresh, nan, np.full((1, 8, 8, 1), 0.5), train[7:8], near,
                                          np.full((1, 8, 8, 1), 1.0) - 0.1 * (np.arange(64) % 2).reshape(1, 8, 8, 1)]))
    assert verdicts[0].released and verdicts[0].nearest_training_distance > 0.05
    assert verdicts[1].reason.startswith("not finite")
    assert verdicts[2].reason.startswith("blank")
    assert verdicts[3].reason.startswith("near-copy of training image 7")
    assert verdicts[4].reason.startswith("closer to training image 3")
    assert verdicts[5].reason.startswith("mean intensity")
    with pytest.raises(ValueError, match="QA index holds"):
        gate.check(rng.uniform(0, 1, (1, 16, 16, 1)))


def test_a_calibrated_gate_saves_and_loads_as_one_file(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    np.savez(tmp_path / "held_out.npz", images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8))
    gate = QualityGate.from_image_sets(str(tmp_path / "train.npz"), str(tmp_path / "held_out.npz"))
    assert gate.threshold is not None and gate.threshold > 0.2  # uniform noise images are far apart
    gate.save(tmp_path / "gate.npz")
    loaded = QualityGate.from_image_sets(str(tmp_path / "gate.npz"))
    assert loaded.threshold == gate.threshold and np.array_equal(loaded.train.numpy(), gate.train.numpy())
    assert loaded.mean_range == gate.mean_range
    with pytest.raises(ValueError, match="already calibrated"):
        QualityGate.from_image_sets(str(tmp_path / "gate.npz"), str(tmp_path / "held_out.npz"))


def test_dicom_output_round_trips_and_says_synthetic(model_dir, database, tmp_path):
    import pydicom

    with TestClient(create_app(make_service(model_dir, database, tmp_path / "s"))) as client:
        dicom = client.post("/api/v1/generate", json={"model": "brain", "class_label": "tumor", "n_samples": 2,
                                                      "seed": 3, "output_format": "dicom"}).json()["id"]
        png = client.post("/api/v1/generate", json={"model": "brain", "class_label": "tumor", "n_samples": 2,
                                                    "seed": 3}).json()["id"]
        wait_for_job(client, dicom), wait_for_job(client, png)
        with zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/jobs/{dicom}/images").content)) as archive:
            files = [pydicom.dcmread(io.BytesIO(archive.read(name))) for name in sorted(archive.namelist())
                     if name.endswith(".dcm")]
        pngs, _ = zip_images(client.get(f"/api/v1/jobs/{png}/images"))
    assert len(files) == 2
    for ds, name in zip(files, sorted(pngs), strict=True):
        assert np.array_equal(ds.pixel_array.astype(int), pngs[name])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert str(ds.PatientName) == "SYNTHETIC^MEDSYN" and ds.PatientID == "SYNTHETIC"
        assert ds.ConversionType == "SYN" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (8, 8, 1)
        assert "SYNTHETIC" in ds.ImageComments and "seed 3" in ds.ImageComments
    # one job = one series of one study, its instances numbered 1..N (a viewer once showed 2 studies here)
    assert len({ds.SOPInstanceUID for ds in files}) == 2
    assert len({ds.StudyInstanceUID for ds in files}) == len({ds.SeriesInstanceUID for ds in files}) == 1
    assert sorted(int(ds.InstanceNumber) for ds in files) == [1, 2]


def test_rgb_dicom_round_trips():
    import pydicom

    from medsyn.synthetic_marking import dicom_bytes

    image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(image, "SYNTHETIC")))
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.PlanarConfiguration == 0
    assert np.array_equal(ds.pixel_array, image)
    with pytest.raises(ValueError, match="uint8 image"):
        dicom_bytes(image.astype(np.float32), "x")


def test_npz_output_is_the_clis_layout(model_dir, tmp_path):
    with TestClient(create_app(make_service(model_dir, str(tmp_path / "db.sqlite"), tmp_path / "s"))) as client:
        job_id = client.post("/api/v1/generate", json={"model": "brain", "class_label": "healthy", "n_samples": 3,
                                                       "seed": 2, "output_format": "npz"}).json()["id"]
        wait_for_job(client, job_id)
        archive = np.load(io.BytesIO(client.get(f"/api/v1/jobs/{job_id}/images").content))
    assert archive["images"].shape == (3, 16, 16) and archive["labels"].tolist() == [0, 0, 0]
    assert archive["indices"].tolist() == [0, 1, 2] and archive["class_names"].tolist() == ["healthy", "tumor"]


def test_a_restart_requeues_running_jobs_and_finishes_them_identically(model_dir, database, tmp_path):
    first = make_service(model_dir, database, tmp_path / "s")
    job = first.submit(JobRequest("brain", class_label="tumor", n_samples=6, seed=4))
    work = first.claim_batch(first.models["brain"])  # running, as a killed server leaves it
    model = first.models["brain"]
    first.store_batch(model, type(work)(work.jobs, work.items[:2]),
                      sample_images(model.pipe, [ImageKey(4, i, 1) for i in range(2)], SamplingSettings()),
                      [QAVerdict(True)] * 2)
    (tmp_path / "s" / job.id / ".tmp-99-tumor_4_000002.png").write_bytes(b"half")  # a write cut short
    assert first.get_job(job.id).status == "running"
    with TestClient(create_app(make_service(model_dir, database, tmp_path / "s"))) as client:
        done = wait_for_job(client, job.id)
        images, qa = zip_images(client.get(f"/api/v1/jobs/{job.id}/images"))
    assert done["status"] == "done" and [entry["index"] for entry in qa] == list(range(6))
    expected = cli_images(model_dir, tmp_path / "cli", "tumor", 4, 6)
    assert sorted(images) == sorted(expected)
    assert all(np.abs(images[name] - expected[name]).max() <= 1 for name in expected)
    assert not list((tmp_path / "s").rglob(".tmp-*"))


def test_a_restart_fails_jobs_of_models_no_longer_served(model_dir, tmp_path):
    database = str(tmp_path / "db.sqlite")
    job = make_service(model_dir, database, tmp_path / "s").submit(JobRequest("brain", n_samples=1))
    model = ServedModel.load("other", str(model_dir))
    service = GenerationService({"other": model}, open_database(database), tmp_path / "s", LIMITS)
    service.start()
    service.stop()
    failed = service.get_job(job.id)
    assert failed.status == "failed" and "not served since the server restarted" in failed.error


def test_api_keys_rate_limit_and_quota(model_dir, database, tmp_path):
    from sqlalchemy import text

    from medsyn.serving.api_keys import create_api_key, key_hash

    service = make_service(model_dir, database, tmp_path / "s")
    with service.sessions() as session:
        key = create_api_key(session, "radiology", requests_per_minute=3, images_per_day=4)
    with service.sessions() as session:  # stored as a hash only
        stored = session.execute(text("SELECT * FROM api_keys")).all()
    assert len(stored) == 1 and key not in repr(stored) and key_hash(key) in repr(stored)
    with TestClient(create_app(service, manage_workers=False)) as client:
        assert client.get("/api/v1/models").status_code == 401
        assert client.get("/api/v1/models", headers={"Authorization": "Bearer msk_wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get("/api/v1/models", headers=auth).status_code == 200
        over = client.post("/api/v1/generate", json={"model": "brain", "n_samples": 5}, headers=auth)
        assert over.status_code == 429 and "quota is 4 images a day" in over.text
        assert client.post("/api/v1/generate", json={"model": "brain", "n_samples": 4}, headers=auth
                           ).status_code == 202
        limited = client.get("/api/v1/models", headers=auth)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert client.get("/healthz").status_code == 200  # health and metrics stay open
    from sqlalchemy import select

    from medsyn.serving.database import AuditEvent

    with service.sessions() as session:  # the audit trail: who asked for what, of which model version
        events = session.scalars(select(AuditEvent)).all()
    assert [(e.action, e.api_key_id, e.model_version, e.client) for e in events] == [
        ("generate", 1, service.models["brain"].version, "testclient")]


def test_serve_cli_creates_keys_and_refuses_an_open_port_without_them(tmp_path, capsys, model_dir):
    assert main(["serve", "--storage", str(tmp_path), "--model", f"brain={model_dir}", "--host", "0.0.0.0"]) == 2
    assert "listens on localhost only" in capsys.readouterr().err
    assert main(["serve", "--storage", str(tmp_path), "--model", f"brain={model_dir}",
                 "--train-index", "lung=x.npz"]) == 2
    assert "no --model of that name" in capsys.readouterr().err
    assert main(["serve", "--storage", str(tmp_path), "--create-key", "ward-7"]) == 0
    assert "msk_" in capsys.readouterr().out
    assert main(["serve", "--storage", str(tmp_path), "--create-key", "ward-7"]) == 2
    assert "exists already" in capsys.readouterr().err


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def _start_server(model_dir, storage, port) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "medsyn.cli", "serve", "--model", f"brain={model_dir}",
                               "--storage", str(storage), "--port", str(port), "--max-batch", "2",
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while _get_json(f"http://127.0.0.1:{port}/healthz") is None:
        assert server.poll() is None, server.communicate()[0]
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    return server


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_delivers_the_whole_job(model_dir, tmp_path):
    port, storage = free_port(), tmp_path / "storage"
    api = f"http://127.0.0.1:{port}/api/v1"
    server = _start_server(model_dir, storage, port)
    try:
        job_id = _post_json(f"{api}/generate", {"model": "brain", "class_label": "tumor", "n_samples": 8, "seed": 9,
                                                "n_steps_each": 100})["id"]
        deadline = time.monotonic() + 60
        while (job := _get_json(f"{api}/jobs/{job_id}"))["progress"]["images_done"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.kill()  # SIGKILL: no shutdown handler runs
        server.wait()
    assert job["status"] == "running" and job["progress"]["images_done"] < 8
    server = _start_server(model_dir, storage, port)
    try:
        deadline = time.monotonic() + 120
        while (job := _get_json(f"{api}/jobs/{job_id}"))["status"] != "done":
            assert job["status"] == "running" or job["status"] == "queued", job
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with urllib.request.urlopen(f"{api}/jobs/{job_id}/images", timeout=10) as reply:
            archive = zipfile.ZipFile(io.BytesIO(reply.read()))
    finally:
        server.terminate()
        server.communicate(timeout=30)
    names = sorted(n for n in archive.namelist() if n.endswith(".png"))
    assert names == [f"tumor_9_{i:06d}.png" for i in range(8)]
    assert main(["generate", "--model", str(model_dir), "--class-label", "tumor", "--num-images", "8", "--seed", "9",
                 "--n-steps-each", "100", "--output-dir", str(tmp_path / "cli")]) == 0
    for name in names:
        served = np.asarray(Image.open(io.BytesIO(archive.read(name))), dtype=int)
        assert np.abs(served - np.asarray(Image.open(tmp_path / "cli" / name), dtype=int)).max() <= 1


@needs_chromium
def test_the_web_page_in_headless_chromium(model_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    with served(create_app(make_service(model_dir, str(tmp_path / "db.sqlite"), tmp_path / "s"))) as base:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page()
            page.goto(f"{base}/")
            page.wait_for_function("document.querySelectorAll('#condition option').length === 2")
            page.select_option("#condition", "tumor")
            page.fill("#n", "3")
            page.fill("#seed", "3")
            page.click("#submit")
            page.wait_for_function("document.querySelectorAll('#images img').length === 3 && "
                                   "[...document.querySelectorAll('#images img')].every(i => i.complete && "
                                   "i.naturalWidth === 16)", timeout=30000)
            assert page.text_content("#status") == "done"
            assert page.text_content("#qa").startswith("3 released, 0 withheld")
            # the link is filled after the images, once the whole set's archive has been fetched
            page.wait_for_function("!document.getElementById('download').hidden", timeout=30000)
            assert page.get_attribute("#download", "download").endswith(".zip")
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            page.fill("#n", "999")
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent.includes('n_samples')")
            browser.close()
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000


@pytest.mark.parametrize("resolution", [16, 32])
def test_the_gate_withholds_every_training_image_moved_by_one_pixel(resolution):
    """Each of the 8 one-pixel moves, zero-filled or wrapped around: all withheld as near-copies (the gate once
    re-checked only the 3 plain-nearest training images and released about half of them at 16 px)."""
    from medsyn.data import SimulatedBrainMRI

    from .test_privacy import MOVES, zero_fill_move

    train = SimulatedBrainMRI(resolution=resolution, seed=9).generate(120)["images"]
    gate = QualityGate(train)
    for dy, dx in MOVES:
        for moved in (zero_fill_move(train, dy, dx), np.roll(train, (dy, dx), axis=(1, 2))):
            verdicts = gate.check(moved[..., None] / 255.0)
            assert [v.nearest_training_index for v in verdicts] == list(range(len(train)))
            assert all(not v.released and v.reason.startswith("near-copy") for v in verdicts), (dy, dx)


@pytest.mark.parametrize("kind", ["noise", "brightness", "contrast", "blur", "shift", "mirror"])
def test_the_gate_withholds_a_copy_under_any_nuisance_and_releases_fresh_images(kind):
    """The gate judged by RMS pixel distance released copies with noise of 10 grey levels, a brightness or contrast
    change, a blur or a mirror; it now compares structure, as the audit does."""
    from .test_copy_detection import brains, nuisance

    train = brains(32, 4, 200)
    gate = QualityGate(train)
    assert gate.space == "structure" and gate.index.cached
    copies = nuisance(train[10:20], kind, np.random.default_rng(0))
    verdicts = gate.check(np.concatenate([copies, brains(32, 6, 20)])[..., None] / 255.0)
    assert [v.nearest_training_index for v in verdicts[:10]] == list(range(10, 20))
    assert all(not v.released and v.reason.startswith("near-copy") for v in verdicts[:10]), kind
    assert sum(v.released for v in verdicts[10:]) >= 19  # fresh draws


def test_a_gate_file_keeps_its_space_and_an_older_one_reads_as_pixels(tmp_path):
    train = SimulatedBrainMRI(resolution=32, seed=2).generate(60)["images"]
    np.savez(tmp_path / "train.npz", images=train)
    np.savez(tmp_path / "held_out.npz", images=SimulatedBrainMRI(resolution=32, seed=3).generate(40)["images"])
    gate = QualityGate.from_image_sets(str(tmp_path / "train.npz"), str(tmp_path / "held_out.npz"))
    assert gate.space == "structure" and 0 < gate.threshold < 2
    gate.save(tmp_path / "gate.npz")
    loaded = QualityGate.from_image_sets(str(tmp_path / "gate.npz"))
    assert (loaded.space, loaded.threshold) == ("structure", gate.threshold)
    with pytest.raises(ValueError, match="calibrated in space 'structure'"):
        QualityGate.from_image_sets(str(tmp_path / "gate.npz"), space="pixels")
    np.savez(tmp_path / "old.npz", images=train, qa_threshold=np.float64(0.05))  # written before the space was
    old = QualityGate.from_image_sets(str(tmp_path / "old.npz"))
    assert (old.space, old.threshold) == ("pixels", 0.05)
    assert QualityGate(train[:, :8, :8]).space == "pixels"  # too small for structure

