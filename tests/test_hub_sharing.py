"""Saved folders are Hub repos: they load from a Hub id through diffusers' own download code (a loopback Hub), with
medsyn and, through the code they ship, with stock diffusers alone; images match exactly."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from medsyn.pipelines import MediSynPipeline, ScoreLangevinPipeline
from medsyn.pipelines.hub_folder import shipped_sources

from .conftest import get_dummy_medisyn_pipeline, get_dummy_pipeline
from .fake_hub import FakeHub

BLOCK_MEDSYN = '''
import importlib.abc, sys
class BlockMedsyn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "medsyn" or name.startswith("medsyn."):
            raise ImportError(f"medsyn is not installed here ({name})")
sys.meta_path.insert(0, BlockMedsyn())
'''

GENERATE = '''
import numpy as np, torch
def generate(pipe, kind):
    if kind == "medisyn":
        return pipe("axial T1 brain MRI, healthy", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    labels = [0, 1] if kind == "score" else None
    return pipe(class_labels=labels, batch_size=2, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
'''

REPOS = {"score": "user/score-tiny", "unconditional": "user/score-unconditional", "medisyn": "user/medisyn-tiny"}


def _generate(pipe, kind):
    namespace: dict = {}
    exec(GENERATE, namespace)
    return namespace["generate"](pipe, kind)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The three kinds of folder medsyn writes, with the images medsyn's in-memory pipelines make."""
    root = tmp_path_factory.mktemp("hub")
    pipelines = {"score": get_dummy_pipeline(), "unconditional": get_dummy_pipeline(num_classes=None),
                 "medisyn": get_dummy_medisyn_pipeline()}
    for kind, pipe in pipelines.items():
        pipe.save_pretrained(root / kind)
        np.save(root / f"{kind}.npy", _generate(pipe, kind))
    return root


def _run(code: str, saved, hub: FakeHub | None = None) -> str:
    env = {**os.environ, "HF_HUB_CACHE": str(saved / "cache"), "HF_MODULES_CACHE": str(saved / "modules"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=saved, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _check_all(load: str, sources: dict[str, str], saved) -> str:
    return GENERATE + textwrap.dedent(f'''
        for kind, source in {sources!r}.items():
            pipe = {load}
            pipe.set_progress_bar_config(disable=True)
            reference = np.load(f"{saved}/{{kind}}.npy")
            assert np.array_equal(generate(pipe, kind), reference), kind
            print(kind, type(pipe).__module__)
    ''')


def test_a_saved_folder_ships_code_that_imports_no_medsyn(saved):
    index = json.loads((saved / "score" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_score_langevin", "ScoreLangevinPipeline"]
    assert index["scheduler"] == ["scheduling_annealed_langevin", "AnnealedLangevinScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["class_names"] == {"0": "healthy", "1": "tumor"}  # not a list: diffusers reads lists as components
    assert (saved / "score" / "scheduler" / "scheduling_annealed_langevin.py").is_file()
    medisyn_index = json.loads((saved / "medisyn" / "model_index.json").read_text())
    assert medisyn_index["_class_name"] == ["pipeline_medisyn", "MediSynPipeline"]
    assert medisyn_index["scheduler"][0] == "diffusers"  # stock components ship no code
    for folder in (saved / "score", saved / "score" / "scheduler", saved / "medisyn"):
        for file in folder.glob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                assert not any(name.split(".")[0] == "medsyn" for name in names), (file, names)


def test_code_that_cannot_ship_stops_the_save_before_anything_is_written(tmp_path, monkeypatch):
    import medsyn.pipelines.hub_folder as hub_folder

    monkeypatch.setattr(hub_folder, "SHIPPABLE_IMPORTS", hub_folder.SHIPPABLE_IMPORTS - {"diffusers"})
    with pytest.raises(ValueError, match="imports diffusers.*stock diffusers may not have"):
        get_dummy_pipeline().save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_modules_reached_only_indirectly_are_imported_by_the_entry_file():
    """diffusers copies only the files the loaded file imports; hub_folder's own import of output_files would be
    missing from a local folder's module cache otherwise."""
    sources = shipped_sources("medsyn.pipelines.pipeline_score_langevin")
    assert "from .output_files import" in sources["pipeline_score_langevin.py"]
    assert set(sources) >= {"step_callbacks.py", "hub_folder.py", "output_files.py", "validation.py"}


def test_medsyn_loads_a_hub_id_through_diffusers_download_code(saved):
    with FakeHub({repo: saved / kind for kind, repo in REPOS.items()}) as hub:
        load = "{'score': ScoreLangevinPipeline, 'unconditional': ScoreLangevinPipeline, "
        load += "'medisyn': MediSynPipeline}[kind].from_pretrained(source)"
        code = "from medsyn.pipelines import MediSynPipeline, ScoreLangevinPipeline\n"
        output = _run(code + _check_all(load, REPOS, saved), saved, hub)
    assert output.count("medsyn.pipelines.") == 3
    assert any("/resolve/" in request and "diffusion_pytorch_model.safetensors" in request for request in hub.requests)


def test_stock_diffusers_without_medsyn_loads_hub_ids_and_folders_with_trust_remote_code(saved):
    local = {kind: str(saved / kind) for kind in REPOS}
    load = "DiffusionPipeline.from_pretrained(source, trust_remote_code=True)"
    code = BLOCK_MEDSYN + "from diffusers import DiffusionPipeline\n"
    with FakeHub({repo: saved / kind for kind, repo in REPOS.items()}) as hub:
        output = _run(code + _check_all(load, REPOS, saved), saved, hub)
    assert output.count("diffusers_modules") == 3
    output = _run(code + _check_all(load, local, saved) + textwrap.dedent(f'''
        pipe.save_pretrained("{saved}/medisyn-resaved")  # saved again without medsyn, it still ships its code
        DiffusionPipeline.from_pretrained("{saved}/score", trust_remote_code=True).save_pretrained(
            "{saved}/score-resaved")
    '''), saved)
    assert output.count("diffusers_modules") == 3
    for kind in ("score", "medisyn"):
        pipe = (ScoreLangevinPipeline if kind == "score" else MediSynPipeline).from_pretrained(saved / f"{kind}-resaved")
        assert np.array_equal(_generate(pipe, kind), np.load(saved / f"{kind}.npy"))


def test_generate_cli_reads_a_hub_id(saved):
    with FakeHub({"user/score-tiny": saved / "score"}) as hub:
        _run(f'''from medsyn.cli import main
assert main(["generate", "--model", "user/score-tiny", "--class-label", "tumor", "--num-images", "2",
             "--output-dir", "{saved}/generated", "--num-inference-steps", "2", "--n-steps-each", "1"]) == 0''',
             saved, hub)
    assert sorted(p.name for p in (saved / "generated").glob("*.png")) == ["tumor_0_000000.png", "tumor_0_000001.png"]


def test_folders_saved_before_code_shipping_still_load(tmp_path):
    """Folders from earlier medsyn versions: class names as a list, the scheduler named by its medsyn module."""
    pipe = get_dummy_pipeline()
    pipe.save_pretrained(tmp_path / "old")
    index = json.loads((tmp_path / "old" / "model_index.json").read_text())
    index.update(_class_name="ScoreLangevinPipeline", class_names=["healthy", "tumor"],
                 scheduler=["medsyn.schedulers.scheduling_annealed_langevin", "AnnealedLangevinScheduler"])
    (tmp_path / "old" / "model_index.json").write_text(json.dumps(index))
    for file in (tmp_path / "old").rglob("*.py"):
        file.unlink()
    loaded = ScoreLangevinPipeline.from_pretrained(tmp_path / "old")
    assert loaded.class_names == ["healthy", "tumor"]
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    expected = pipe(class_labels=[0, 1], generator=generators, output_type="pt").images
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    assert torch.equal(loaded(class_labels=[0, 1], generator=generators, output_type="pt").images, expected)


def test_the_weights_are_as_readable_as_the_rest_of_the_folder(tmp_path):
    """safetensors writes its file 0600; a saved folder's weights get the mode of its other files."""
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "model").rglob("*") if path.is_file()}
    assert len(set(modes.values())) == 1, modes
