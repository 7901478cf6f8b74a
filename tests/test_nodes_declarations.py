"""Every node's declaration is one ComfyUI accepts and shows well: types, defaults, tooltips, names."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
from harness.fixtures import comfy  # noqa: F401 - fixture

import nodes

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
KNOWN_OPTIONS = {
    "default", "min", "max", "step", "round", "multiline", "placeholder", "dynamicPrompts", "forceInput", "lazy",
    "rawLink", "tooltip", "socketless", "widgetType", "image_upload", "control_after_generate", "options",
    "multi_select", "remote", "advanced",
}  # fmt: skip
CLASSES = sorted(nodes.NODE_CLASS_MAPPINGS.items())


@pytest.fixture(params=[c[0] for c in CLASSES])
def node_class(request: pytest.FixtureRequest, comfy) -> type:  # noqa: F811 - fixture use
    return nodes.NODE_CLASS_MAPPINGS[request.param]


def test_every_node_has_a_display_name_and_unison_category() -> None:
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)
    for key, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert key.startswith("Unison")
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key].startswith("Unison ")
        assert cls.CATEGORY == "Unison" or cls.CATEGORY.startswith("Unison/")
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20


def test_input_declarations_are_valid(node_class: type) -> None:
    spec = node_class.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            assert isinstance(value, tuple) and 1 <= len(value) <= 2, name
            type_ = value[0]
            options = value[1] if len(value) == 2 else {}
            assert set(options) <= KNOWN_OPTIONS, (name, set(options) - KNOWN_OPTIONS)
            assert isinstance(options.get("tooltip"), str) and options["tooltip"], f"{name} has no tooltip"
            if isinstance(type_, list):
                assert type_, f"combo {name} is empty"
                assert all(isinstance(v, str) for v in type_)
                if "default" in options:
                    assert options["default"] in type_
                continue
            assert isinstance(type_, str) and type_ and type_ != "*", name
            if type_ in ("INT", "FLOAT") and "default" in options:
                default = options["default"]
                assert isinstance(default, int if type_ == "INT" else float)
                assert options.get("min", default) <= default <= options.get("max", default), name
            if type_ == "INT" and options.get("control_after_generate"):
                assert name == "seed"


def test_output_declarations_are_valid(node_class: type) -> None:
    types = node_class.RETURN_TYPES
    assert isinstance(types, tuple)
    names = getattr(node_class, "RETURN_NAMES", types)
    assert len(names) == len(types) and len(set(names)) == len(names)
    if types:
        tooltips = node_class.OUTPUT_TOOLTIPS
        assert len(tooltips) == len(types) and all(isinstance(t, str) and t for t in tooltips)
    else:
        assert node_class.OUTPUT_NODE is True
    assert callable(getattr(node_class, node_class.FUNCTION))
    # The function accepts every declared input by name (ComfyUI calls it with keyword arguments).
    signature = inspect.signature(getattr(node_class, node_class.FUNCTION))
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name in spec.get(section) or {}:
            assert has_kwargs or name in signature.parameters, name


def test_validate_inputs_only_names_declared_widgets(comfy) -> None:  # noqa: F811 - fixture use
    """VALIDATE_INPUTS turns off ComfyUI's own checks for the inputs it names: they must be widgets it checks."""
    validated = {k: c for k, c in CLASSES if hasattr(c, "VALIDATE_INPUTS")}
    assert set(validated) == {"UnisonPlanner", "UnisonTaskRouter", "UnisonSaveText"}
    for cls in validated.values():
        spec = cls.INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in inspect.signature(cls.VALIDATE_INPUTS).parameters:
            assert name in declared
            assert isinstance(declared[name][0], list) or declared[name][0] in WIDGET_TYPES


def test_loaders_show_a_placeholder_when_folders_are_empty(comfy) -> None:  # noqa: F811 - fixture use
    spec = nodes.NODE_CLASS_MAPPINGS["UnisonVaceLoader"].INPUT_TYPES()["required"]
    assert spec["transformer"][0] == ["(no model files in models/diffusion_models)"]
    planner = nodes.NODE_CLASS_MAPPINGS["UnisonPlannerLoader"].INPUT_TYPES()["required"]
    assert planner["model"][0] == ["(no Qwen2.5-VL folders in models/unison)"]
    assert planner["lora"][0] == ["none"]


def test_unison_model_folder_is_registered(comfy) -> None:  # noqa: F811 - fixture use
    import folder_paths

    assert folder_paths.get_folder_paths("unison") == [str(comfy.models / "unison")]
    nodes.comfy_bridge.register_model_folder()  # idempotent
    assert folder_paths.get_folder_paths("unison") == [str(comfy.models / "unison")]


def test_pack_imports_the_way_comfyui_loads_it() -> None:
    """ComfyUI imports the pack folder's __init__.py under a mangled name (nodes.py:2111-2204)."""
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)
        assert module.WEB_DIRECTORY == "./web"
        assert (ROOT / "web" / "unison.js").is_file()
        # The engine is the pack's own copy, imported relatively: nothing named "nodes" or
        # "unison_runtime" at the top level was needed (ComfyUI's own nodes.py owns "nodes").
        locator = sys.modules[f"{name}.nodes._runtime"]
        assert locator.runtime.__name__ == f"{name}.unison_runtime"
        assert sys.modules[f"{name}.nodes.planning"].plan_mod.__name__ == f"{name}.unison_runtime.plan"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_web_directory_is_declared_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    tool_comfy = pyproject.split("[tool.comfy]", 1)[1].split("\n[", 1)[0]
    assert "web" not in [line.split("=")[0].strip() for line in tool_comfy.splitlines() if "=" in line]


def test_nodes_import_without_comfyui() -> None:
    """No ComfyUI module is needed to import the pack (the fake ones are not installed here)."""
    assert "folder_paths" not in sys.modules and "comfy" not in sys.modules
    assert nodes.comfy_bridge.input_directory() is None
    assert nodes.comfy_bridge.model_files("vae") == []
    blocker = nodes.comfy_bridge.execution_blocker(None)
    assert nodes.comfy_bridge.is_blocked(blocker) and not nodes.comfy_bridge.is_blocked("text")


def test_constants_repeated_to_keep_node_imports_light_match_the_engine() -> None:
    """nodes/ repeats a few engine values so INPUT_TYPES needs no torch; they must not drift apart."""
    from nodes import generation, loaders
    from unison_runtime import projector
    from unison_runtime.weights import DTYPE_NAMES

    assert generation.REFERENCE_CONTEXT_LENGTH == projector.REFERENCE_CONTEXT_LENGTH
    assert set(loaders.DTYPES) - {loaders.AUTO} <= set(DTYPE_NAMES)
