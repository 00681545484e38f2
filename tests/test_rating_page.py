"""``medsyn rate``: the images it serves, its API (raters apart, undo, duplicates, bad input), and the page itself in
headless Chromium (keyboard rating, reload mid-way, undo, a screenshot)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medsyn.rlhf.rating_app import create_rating_app
from medsyn.rlhf.rating_images import load_images_to_rate
from medsyn.rlhf.ratings import RatingsFile, image_digest

from .browser import free_port, launch_chromium, needs_chromium, served


def samples_npz(path, count: int = 4, captions: bool = True) -> str:
    """Four images as ``medsyn generate --format npz`` writes them: a text-guided model's (captions) or a class
    model's (labels and class names)."""
    images = np.stack([np.full((16, 16), 40 * (i + 1), dtype=np.uint8) for i in range(count)])
    arrays = {"images": images, "labels": np.arange(count) % 2, "class_names": np.array(["healthy", "tumor"])}
    if captions:
        arrays["captions"] = np.array([f"brain MRI number {i}" for i in range(count)])
    np.savez(path, **arrays)
    return str(path)


def test_images_come_with_their_prompts_and_bad_sets_are_named(tmp_path):
    with_captions = load_images_to_rate(samples_npz(tmp_path / "a.npz"))
    assert [i.prompt for i in with_captions] == [f"brain MRI number {i}" for i in range(4)]
    assert with_captions[2].digest == image_digest(np.full((16, 16), 120, dtype=np.uint8))
    by_class = load_images_to_rate(samples_npz(tmp_path / "b.npz", captions=False))
    assert [i.prompt for i in by_class] == ["healthy", "tumor", "healthy", "tumor"]
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        load_images_to_rate(tmp_path / "float.npz")
    np.savez(tmp_path / "none.npz", pictures=np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="no 'images' array"):
        load_images_to_rate(tmp_path / "none.npz")
    np.savez(tmp_path / "long.npz", images=np.zeros((1, 8, 8), dtype=np.uint8), captions=np.array(["x" * 1001]))
    with pytest.raises(ValueError, match="prompt of image 0 has 1001 characters"):
        load_images_to_rate(tmp_path / "long.npz")
    with pytest.raises(ValueError, match="no such file"):
        load_images_to_rate(tmp_path / "missing.npz")


@pytest.fixture
def service(tmp_path):
    images = load_images_to_rate(samples_npz(tmp_path / "samples.npz"))
    ratings = RatingsFile(tmp_path / "ratings.jsonl")
    return TestClient(create_rating_app(images, ratings, model="medisyn-v1")), ratings


def test_the_api_rates_resumes_and_keeps_raters_apart(service):
    client, ratings = service
    first = client.get("/api/next", params={"rater": "dr-a"}).json()
    assert first == {"rated": 0, "total": 4, "done": False, "index": 0, "prompt": "brain MRI number 0",
                     "source": "samples.npz[0]"}
    assert client.post("/api/ratings", json={"rater": "dr-a", "index": 0, "rating": 3}).status_code == 201
    assert client.get("/api/next", params={"rater": "dr-a", "after": 0}).json()["index"] == 1
    assert client.get("/api/next", params={"rater": "dr-a"}).json()["index"] == 1  # a reload resumes
    assert client.get("/api/next", params={"rater": "dr-b"}).json()["index"] == 0  # another rater starts afresh
    skipped_to = client.get("/api/next", params={"rater": "dr-a", "after": 3}).json()["index"]
    assert skipped_to == 1  # past the end it wraps round to the first unrated
    saved = ratings.ratings("dr-a")[0]
    assert (saved.rating, saved.prompt, saved.model, saved.path) == (3, "brain MRI number 0", "medisyn-v1",
                                                                      "samples.npz[0]")
    png = client.get("/api/images/2.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")


def test_undo_duplicates_and_bad_input_get_clear_answers(service):
    client, ratings = service
    rate = {"rater": "dr-a", "index": 1, "rating": 2}
    assert client.post("/api/ratings", json=rate).status_code == 201
    duplicate = client.post("/api/ratings", json=rate)
    assert duplicate.status_code == 409 and "already rated image 1" in duplicate.json()["detail"]
    assert client.post("/api/undo", json={"rater": "dr-a"}).json() == {"index": 1, "rating": 2}
    assert ratings.ratings() == [] and client.post("/api/ratings", json=rate).status_code == 201
    assert client.post("/api/undo", json={"rater": "dr-b"}).status_code == 409
    out_of_scale = client.post("/api/ratings", json={**rate, "rating": 4})
    assert out_of_scale.status_code == 422 and out_of_scale.json()["detail"][0]["loc"] == ["body", "rating"]
    assert client.post("/api/ratings", json={**rate, "index": 9}).status_code == 404
    assert client.get("/api/images/9.png").status_code == 404
    assert client.post("/api/ratings", json={**rate, "rater": "a b"}).status_code == 422
    assert client.post("/api/ratings", json={**rate, "aspect": "beauty"}).status_code == 422
    for index in range(4):
        client.post("/api/ratings", json={**rate, "index": index, "aspect": "prompt_match"})
    assert client.get("/api/next", params={"rater": "dr-a", "aspect": "prompt_match"}).json()["done"] is True


@needs_chromium
def test_the_page_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    images = load_images_to_rate(samples_npz(tmp_path / "samples.npz"))
    ratings = RatingsFile(tmp_path / "ratings.jsonl")
    with served(create_rating_app(images, ratings)) as base:
        url = f"{base}/?rater=dr-a"
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page()
            page.goto(url)
            expect_progress(page, "0 of 4 rated", "brain MRI number 0")
            page.keyboard.press("3")
            expect_progress(page, "1 of 4 rated", "brain MRI number 1")
            page.keyboard.press("s")  # skip image 1
            expect_progress(page, "1 of 4 rated", "brain MRI number 2")
            page.keyboard.press("1")
            expect_progress(page, "2 of 4 rated", "brain MRI number 3")
            page.reload()  # mid-way: resumes at the first unrated image, the skipped one
            expect_progress(page, "2 of 4 rated", "brain MRI number 1")
            page.keyboard.press("u")  # undo the last rating (image 2): that image comes back
            expect_progress(page, "1 of 4 rated", "brain MRI number 2")
            page.get_by_role("button", name="2 fair").click()
            expect_progress(page, "2 of 4 rated", "brain MRI number 3")
            page.wait_for_function("document.getElementById('image').complete && "
                                   "document.getElementById('image').naturalWidth === 16")
            shot = tmp_path / "rating-page.png"
            page.screenshot(path=str(shot))
            browser.close()
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000
    lines = [json.loads(line) for line in (tmp_path / "ratings.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines] == ["rating", "rating", "retraction", "rating"]
    assert [(r.prompt, r.rating) for r in ratings.ratings("dr-a")] == [("brain MRI number 0", 3),
                                                                      ("brain MRI number 2", 2)]


def expect_progress(page, progress: str, prompt: str) -> None:
    page.wait_for_function(
        "([progress, prompt]) => document.getElementById('progress').textContent === progress && "
        "document.getElementById('prompt').textContent === 'Prompt: ' + prompt", arg=[progress, prompt], timeout=10000)


def test_medsyn_rate_serves_until_stopped_and_names_bad_input(tmp_path, capsys):
    import subprocess
    import sys
    import urllib.request

    from medsyn.cli import main

    assert main(["rate", "--images", str(tmp_path / "missing.npz"), "--ratings", str(tmp_path / "r.jsonl")]) == 2
    assert "--images" in capsys.readouterr().err and not (tmp_path / "r.jsonl").exists()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "medsyn.cli", "rate", "--images", samples_npz(tmp_path / "s.npz"),
                               "--ratings", str(tmp_path / "r.jsonl"), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, state = time.monotonic() + 60, None
        while state is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next?rater=dr-a", timeout=2) as reply:
                    state = json.loads(reply.read())
            except OSError:
                time.sleep(0.2)
        assert state == {"rated": 0, "total": 4, "done": False, "index": 0, "prompt": "brain MRI number 0",
                         "source": "s.npz[0]"}
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert f"open http://127.0.0.1:{port}/?rater=YOUR_ID" in output
