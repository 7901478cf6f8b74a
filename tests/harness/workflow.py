"""UI-format workflow → API-format prompt, and a small executor with ComfyUI's rules.

Conversion follows what ComfyUI's frontend does in ``graphToPrompt`` (COMFYUI.md §7.14):
``widgets_values`` are positional in widget order (the node class's INPUT_TYPES order, required
then optional, skipping socket-only types and ``forceInput``); an INT widget with
``control_after_generate`` or named ``seed``/``noise_seed`` is followed by an extra value (the
"randomize"/"fixed" control), and an ``image_upload``/``video_upload`` combo by the upload button's
value; a linked widget keeps its value slot but takes the link. Muted nodes (mode 2) are dropped,
bypassed nodes (mode 4) are dropped and their consumers rewired to the bypassed node's input of the
same type; ``Note``/``MarkdownNote`` are dropped and ``Reroute`` nodes are followed.

Execution follows ``execution.py``: only output nodes and their ancestors run, each once, in
dependency order; an input holding an ``ExecutionBlocker`` blocks its consumer (which then passes
the blocker on instead of running); validation at submit time checks required inputs, link types,
combo values, min/max (except for inputs named by ``VALIDATE_INPUTS``) and calls ``VALIDATE_INPUTS``
with widget values (linked inputs as ``None``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


def ordered_inputs(cls: type) -> list[tuple[str, Any, dict[str, Any], bool]]:
    """(name, type, options, optional) in the order ComfyUI lists them (``/object_info`` input_order)."""
    spec = cls.INPUT_TYPES()
    found = []
    for section, optional in (("required", False), ("optional", True)):
        for name, value in (spec.get(section) or {}).items():
            type_ = value[0]
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            found.append((name, type_, options, optional))
    return found


def is_widget(type_: Any, options: dict[str, Any]) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(type_, list) or (isinstance(type_, str) and type_ in WIDGET_TYPES)


def extra_widget_values(name: str, type_: Any, options: dict[str, Any]) -> int:
    """How many values the frontend saves after this widget's own (control_after_generate, upload button)."""
    extra = 0
    if type_ == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        extra += 1
    if options.get("image_upload") or options.get("video_upload"):
        extra += 1
    return extra


class ConversionError(ValueError):
    pass


def ui_to_api(workflow: dict[str, Any], classes: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow into the API prompt ComfyUI's frontend would queue."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def resolve(link_id: int) -> list[Any] | None:
        _, origin_id, origin_slot, _target, _slot, type_ = links[link_id]
        origin = nodes[origin_id]
        if origin["type"] == "Reroute":
            upstream = origin["inputs"][0].get("link")
            return resolve(upstream) if upstream is not None else None
        mode = origin.get("mode", 0)
        if mode == MUTED:
            return None
        if mode == BYPASSED:
            inputs = origin.get("inputs") or []
            candidates = []
            if origin_slot < len(inputs):
                candidates.append(inputs[origin_slot])
            candidates += inputs
            for candidate in candidates:
                if candidate.get("type") == type_ and candidate.get("link") is not None:
                    return resolve(candidate["link"])
            return None
        return [str(origin_id), origin_slot]

    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        type_name = node["type"]
        if type_name in VIRTUAL_NODES or type_name == "Reroute" or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if type_name not in classes:
            raise ConversionError(f"node {node['id']}: unknown node type {type_name!r}")
        cls = classes[type_name]
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in node.get("inputs") or [] if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        position = 0
        for name, input_type, options, _optional in ordered_inputs(cls):
            if is_widget(input_type, options):
                if position >= len(values):
                    raise ConversionError(f"node {node['id']} ({type_name}): no widget value for {name!r} "
                                          f"(widgets_values has {len(values)})")
                value = values[position]
                position += 1 + extra_widget_values(name, input_type, options)
                if name in linked:
                    source = resolve(linked[name])
                    if source is not None:
                        inputs[name] = source
                else:
                    inputs[name] = value
            elif name in linked:
                source = resolve(linked[name])
                if source is not None:
                    inputs[name] = source
        if position != len(values):
            raise ConversionError(f"node {node['id']} ({type_name}): {len(values)} widget values, the node "
                                  f"definition accounts for {position}")
        prompt[str(node["id"])] = {"class_type": type_name, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or type_name}}
    return prompt


# --------------------------------------------------------------------------- validation and execution


def _types_match(received: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return received in ("COMBO", "STRING")
    if not received != expected:  # noqa: SIM202 - AnyType overrides only __ne__, as ComfyUI relies on
        return True
    return bool(set(str(received).split(",")) & set(str(expected).split(",")))


def _validate_args(cls: type) -> list[str] | None:
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return [name for name, *_ in ordered_inputs(cls)]
    return list(params)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def ancestors(prompt: dict[str, dict[str, Any]], roots: list[str]) -> list[str]:
    """Nodes needed by ``roots``, dependencies first."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if _is_link(value):
                visit(value[0])
        order.append(node_id)

    for root in roots:
        visit(root)
    return order


def output_nodes(prompt: dict[str, dict[str, Any]], classes: dict[str, type]) -> list[str]:
    return sorted((i for i, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)), key=int)


def validate_prompt(prompt: dict[str, dict[str, Any]], classes: dict[str, type]) -> dict[str, list[str]]:
    """ComfyUI's submit-time checks; returns {node_id: [error, ...]} (empty when the prompt is valid)."""
    errors: dict[str, list[str]] = {}
    for node_id in ancestors(prompt, output_nodes(prompt, classes)):
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        problems: list[str] = []
        custom = _validate_args(cls) or []
        custom_values: dict[str, Any] = {}
        for name, input_type, options, optional in ordered_inputs(cls):
            value = node["inputs"].get(name)
            if name not in node["inputs"]:
                if not optional:
                    problems.append(f"required input {name!r} is missing")
                continue
            if _is_link(value):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{name}: linked node {value[0]} does not exist")
                    continue
                returns = classes[source["class_type"]].RETURN_TYPES
                if value[1] >= len(returns) or not _types_match(returns[value[1]], input_type):
                    problems.append(f"{name}: return type mismatch ({returns[value[1]]} → {input_type})")
                if name in custom:
                    custom_values[name] = None
                continue
            if name in custom:
                custom_values[name] = value
                continue
            if isinstance(input_type, list):
                if value not in input_type:
                    problems.append(f"{name}: {value!r} not in {input_type[:20]}")
            elif input_type in ("INT", "FLOAT"):
                if "min" in options and value < options["min"]:
                    problems.append(f"{name}: {value} smaller than min {options['min']}")
                if "max" in options and value > options["max"]:
                    problems.append(f"{name}: {value} bigger than max {options['max']}")
        if custom:
            result = cls.VALIDATE_INPUTS(**custom_values)
            if result is not True:
                problems.append(f"custom validation failed: {result}")
        if problems:
            errors[node_id] = problems
    return errors


@dataclass
class Execution:
    """What ran: outputs per node, the ``ui`` dicts (ComfyUI's history outputs), and the order."""

    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    blocked_messages: dict[str, str] = field(default_factory=dict)

    def of_type(self, prompt: dict[str, dict[str, Any]], class_type: str) -> list[str]:
        return [i for i in self.executed if prompt[i]["class_type"] == class_type]


class PromptInvalid(AssertionError):
    def __init__(self, errors: dict[str, list[str]]) -> None:
        self.errors = errors
        super().__init__(f"prompt failed validation: {errors}")


def _hidden_values(cls: type, prompt: dict[str, dict[str, Any]], node_id: str) -> dict[str, Any]:
    """The hidden inputs ComfyUI fills in (``execution.py`` ``get_input_data``): the whole prompt, the node's id."""
    filled = {"PROMPT": prompt, "UNIQUE_ID": node_id, "EXTRA_PNGINFO": None}
    hidden = cls.INPUT_TYPES().get("hidden", {})
    return {name: filled[kind] for name, kind in hidden.items() if kind in filled}


def execute_prompt(prompt: dict[str, dict[str, Any]], classes: dict[str, type]) -> Execution:
    """Validate, then run what the output nodes need, each node once, as ComfyUI's executor does.

    Strong (non-lazy) inputs are evaluated first; a node with an ``ExecutionBlocker`` among its
    evaluated inputs is blocked (no call, not even ``check_lazy_status``) and passes the blocker
    on; otherwise ``check_lazy_status`` names the lazy inputs it needs (ones already evaluated
    are ignored, as in ComfyUI), those are evaluated, and the node is asked again.
    """
    from nodes import comfy_bridge

    errors = validate_prompt(prompt, classes)
    if errors:
        raise PromptInvalid(errors)
    run = Execution()

    def value_of(link: list[Any]) -> Any:
        evaluate(link[0])
        return run.outputs[link[0]][link[1]]

    def evaluate(node_id: str) -> None:
        if node_id in run.outputs:
            return
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        declared = {name: options for name, _t, options, _o in ordered_inputs(cls)}
        kwargs: dict[str, Any] = {}
        pending: dict[str, list[Any]] = {}
        for name, value in node["inputs"].items():
            if name not in declared:  # ComfyUI ignores undeclared inputs
                continue
            if _is_link(value) and declared[name].get("lazy"):
                pending[name] = value
                kwargs[name] = None
            else:
                kwargs[name] = value_of(value) if _is_link(value) else value
        kwargs.update(_hidden_values(cls, prompt, node_id))
        obj = cls()
        while True:
            blocker = next((v for v in kwargs.values() if comfy_bridge.is_blocked(v)), None)
            if blocker is not None:
                run.blocked.append(node_id)
                if blocker.message is not None:
                    run.blocked_messages[node_id] = blocker.message
                run.outputs[node_id] = tuple(blocker for _ in cls.RETURN_TYPES)
                return
            needed = [n for n in obj.check_lazy_status(**kwargs) if n in pending] \
                if hasattr(obj, "check_lazy_status") else []
            if not needed:
                break
            for name in needed:
                kwargs[name] = value_of(pending.pop(name))
        result = getattr(obj, cls.FUNCTION)(**kwargs)
        run.executed.append(node_id)
        if comfy_bridge.is_blocked(result):
            run.outputs[node_id] = tuple(result for _ in cls.RETURN_TYPES)
            return
        if isinstance(result, dict):
            if "ui" in result:
                run.ui[node_id] = result["ui"]
            result = result.get("result", ())
        run.outputs[node_id] = tuple(result)

    for node_id in output_nodes(prompt, classes):
        evaluate(node_id)
    return run
