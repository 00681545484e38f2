"""Saved pipeline folders that are Hub repos, loadable with medsyn and without it.

A folder ships the code of the pipeline and of any component diffusers does not have (the annealed-Langevin
scheduler), so stock diffusers loads it with ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)``:
``model_index.json`` names the pipeline as ``["<module file>", "<class>"]`` and a custom component as
``["<module file in its folder>", "<class>"]``, diffusers' custom-code convention. The shipped files are the
pipeline's own modules, with imports of medsyn modules turned into imports of sibling files, so this module ships
itself too and a pipeline loaded without medsyn saves a folder that loads the same way.

With medsyn installed, its classes load such a folder as their own (no ``trust_remote_code``): the pipeline
entry is read as the loading class and custom components are built from the classes the pipeline module imports.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from medsyn.output_files import write_text_atomically

#: Model cards written before the model has a Hub id load ``YOUR_HUB_USER/<name>``; pushing puts the real id in.
REPO_ID_PLACEHOLDER_USER = "YOUR_HUB_USER"
CARD_PLACEHOLDER = re.compile(rf"{REPO_ID_PLACEHOLDER_USER}/[A-Za-z0-9._-]+")

#: Packages a shipped module may import besides the standard library and its sibling shipped files.
SHIPPABLE_IMPORTS = {"torch", "diffusers", "transformers", "tokenizers", "huggingface_hub", "safetensors", "numpy",
                     "PIL", "peft"}


def _module_file(module_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of module {module_name}")
    return Path(spec.origin)


def _import_target(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from X import ...`` statement reads."""
    if node.level:
        if node.module is None:
            raise ValueError("`from . import name` cannot ship; import the names from their module")
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        return f"{base}.{node.module}" if node.module else None
    return node.module


def shipped_sources(module_name: str) -> dict[str, str]:
    """The source of ``module_name`` and of every module it imports from its own package family, each as the text of
    a flat ``<name>.py`` file whose imports of the others are relative (``from .name import ...``).

    diffusers copies into its module cache only the files a loaded file imports itself, so the first file also
    imports one name from each module it reaches only through another.

    Raises ValueError when a module imports a third-party package stock diffusers users may lack, or when two
    modules would share a file name.
    """
    root = module_name.split(".")[0]
    sources: dict[str, str] = {}
    owners: dict[str, str] = {}
    direct: set[str] = set()
    first_names: dict[str, str] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        stem = name.rsplit(".", 1)[-1]
        if stem in owners:
            if owners[stem] != name:
                raise ValueError(f"modules {owners[stem]} and {name} would both ship as {stem}.py")
            continue
        owners[stem] = name
        path = _module_file(name)
        lines = path.read_text().splitlines(keepends=True)
        package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
        tree = ast.parse("".join(lines))
        first_names[stem] = next(_defined_names(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    _check_shippable(alias.name, root, name)
            elif isinstance(node, ast.ImportFrom):
                target = _import_target(node, package)
                if target.split(".")[0] != root:
                    _check_shippable(target, root, name)
                    continue
                pending.append(target)
                if name == module_name:
                    direct.add(target.rsplit(".", 1)[-1])
                names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
                indent = lines[node.lineno - 1][: node.col_offset]
                statement = f"{indent}from .{target.rsplit('.', 1)[-1]} import {names}\n"
                lines[node.lineno - 1] = statement
                for number in range(node.lineno, node.end_lineno):
                    lines[number] = ""
        sources[f"{stem}.py"] = "".join(lines)
    entry = module_name.rsplit(".", 1)[-1]
    indirect = sorted(set(owners) - direct - {entry})
    if indirect:
        sources[f"{entry}.py"] += "\n# diffusers copies only the files this file imports itself; these are needed by others.\n"
        sources[f"{entry}.py"] += "".join(f"from .{stem} import {first_names[stem]}  # noqa: F401\n" for stem in indirect)
    return sources


def _defined_names(tree: ast.Module):
    """The names a module defines at top level, in order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.Assign):
            yield from (target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id


def _check_shippable(imported: str, root: str, importer: str) -> None:
    top = imported.split(".")[0]
    if top == "__future__" or top in sys.stdlib_module_names or top in SHIPPABLE_IMPORTS:
        return
    if top == root:
        raise ValueError(f"{importer} imports {imported} as a whole package; import the names from their module")
    raise ValueError(f"{importer} imports {imported}, which a user of stock diffusers may not have")


def _is_component_entry(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)


def readable_like_the_rest(folder: Path) -> None:
    """Give files written private (safetensors writes its weights 0600, through a temporary file) the mode the
    process's umask gives any new file, so the weights are as readable as the config beside them."""
    mask = 0o022  # read, not set: os.umask would change it for every thread for a moment
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        pass
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(0o666 & ~mask)


class HubFolderMixin:
    """``save_pretrained`` that ships the code; loading that reads a shipped folder with this environment's classes."""

    #: Libraries whose classes stock diffusers imports itself; any other component's code is shipped.
    _stock_libraries = ("diffusers", "transformers")

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        code, entries = remote_code(self)  # first, so that code which cannot ship stops the save before it starts
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        for relative_path, source in code.items():
            write_text_atomically(folder / relative_path, source)
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("_name_or_path", None)  # where it was loaded from: a local path means nothing on the Hub
        write_text_atomically(folder / "model_index.json",
                              json.dumps({**index, **entries}, indent=2, sort_keys=True) + "\n")
        readable_like_the_rest(folder)

    def _upload_folder(self, working_dir: str | os.PathLike, repo_id: str, *args, **kwargs):
        """``push_to_hub`` uploads the model card of the folder this pipeline was loaded from (naming ``repo_id``),
        not diffusers' generic one."""
        card = self._source_model_card()
        if card is not None:
            source = str(self.config.get("_name_or_path") or "")
            if not os.path.exists(source):  # a Hub repo pushed on under another id: the snippets load the new one
                card = card.replace(f'"{source}"', f'"{repo_id}"').replace(f"--model {source} ", f"--model {repo_id} ")
            with open(os.path.join(working_dir, "README.md"), "w", encoding="utf-8") as file:
                file.write(name_repo_in_card(card, repo_id))
        return super()._upload_folder(working_dir, repo_id, *args, **kwargs)

    def _source_model_card(self) -> str | None:
        source = str(self.config.get("_name_or_path") or "")
        if os.path.isfile(os.path.join(source, "README.md")):
            with open(os.path.join(source, "README.md"), encoding="utf-8") as file:
                return file.read()
        if not source or os.path.exists(source):
            return None
        from huggingface_hub import hf_hub_download

        try:
            with open(hf_hub_download(source, "README.md"), encoding="utf-8") as file:
                return file.read()
        except Exception:  # no card on the Hub, or the Hub out of reach: diffusers' card stands
            return None

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """A shipped pipeline entry ``["module", "Class"]`` read as the class's name, so diffusers' download and
        loading use this class rather than the shipped copy (which would need ``trust_remote_code``)."""
        config = super()._dict_from_json_file(json_file)
        if _is_component_entry(config.get("_class_name")):
            config["_class_name"] = config["_class_name"][1]
        return config

    @classmethod
    def load_config(cls, *args, **kwargs):
        """The config, with each shipped custom component (``["scheduling_x", "XScheduler"]``) pointing at the
        class of that name that this pipeline's module imports: medsyn's own when medsyn is installed."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        module = sys.modules[cls.__module__]
        for name, value in config.items():
            if (name != "_class_name" and _is_component_entry(value) and value[0] not in cls._stock_libraries
                    and value[0] not in sys.modules and isinstance(getattr(module, value[1], None), type)):
                config[name] = [getattr(module, value[1]).__module__, value[1]]
        return loaded


def name_repo_in_card(card: str, repo_id: str) -> str:
    """The card with ``YOUR_HUB_USER/<name>`` placeholders replaced by the repo id it is pushed to."""
    return CARD_PLACEHOLDER.sub(repo_id, card)


def remote_code(pipeline: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The files a folder of ``pipeline`` ships (relative path -> source) and the model_index.json entries that
    name them: the pipeline's module at the top, each custom component's module in the component's folder."""
    code: dict[str, str] = {}
    entries: dict[str, list[str]] = {}
    custom = {name: component for name, component in pipeline.components.items()
              if hasattr(component, "save_pretrained") and type(component).__module__.split(".")[0]
              not in HubFolderMixin._stock_libraries}
    for name, component in [("_class_name", pipeline), *custom.items()]:
        module = type(component).__module__
        folder = "" if name == "_class_name" else f"{name}/"
        code.update({folder + file_name: source for file_name, source in shipped_sources(module).items()})
        entries[name] = [module.rsplit(".", 1)[-1], type(component).__name__]
    return code, entries
