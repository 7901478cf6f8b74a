// Unison: show what a node decided (the plan's task and parameters, notes) on the node itself.
//
// The Python nodes return {"ui": {"text": [...]}}; ComfyUI hands that to onExecuted. The text goes
// into a read-only box the pack owns (a DOM widget: node.addDOMWidget, the frontend's public API),
// with a fixed height that the shipped workflows reserve (tests/harness/build_workflows.py
// DISPLAY_HEIGHT), so the node never grows over its neighbours; long text scrolls. The widget is
// never serialized: not into the saved workflow's widgets_values (it is the last widget, so the
// node definition's widget order is kept) and not into the API prompt.

import { app } from "../../scripts/app.js";

const SHOWS_TEXT = new Set([
  "UnisonPlanner",
  "UnisonTaskRouter",
  "UnisonProjector",
  "UnisonVaceInputs",
  "UnisonVaceSampler",
]);
const WIDGET_NAME = "unison_display";
const LABEL = "Unison decided";
const DISPLAY_HEIGHT = 140;
const PLACEHOLDER = "Run the workflow to see what Unison decided.";

function addDisplay(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (existing) return existing;
  const box = document.createElement("pre"); // text, not an input: read only in every view
  box.className = "unison-display";
  box.setAttribute("role", "status");
  box.setAttribute("aria-label", LABEL);
  box.title = `${LABEL} (read only)`;
  box.textContent = PLACEHOLDER;
  Object.assign(box.style, {
    margin: "0",
    padding: "4px 6px",
    boxSizing: "border-box",
    width: "100%",
    height: `${DISPLAY_HEIGHT}px`,
    overflow: "auto",
    whiteSpace: "pre-wrap",
    wordBreak: "break-word",
    fontFamily: "monospace",
    fontSize: "11px",
    lineHeight: "1.35",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "4px",
    opacity: "0.85",
    userSelect: "text",
  });
  const widget = node.addDOMWidget(WIDGET_NAME, "unison-display", box, {
    serialize: false,
    hideOnZoom: true,
    getValue: () => box.textContent,
    setValue: (value) => {
      box.textContent = value ?? "";
    },
    getMinHeight: () => DISPLAY_HEIGHT,
    getMaxHeight: () => DISPLAY_HEIGHT,
    getHeight: () => DISPLAY_HEIGHT,
  });
  widget.label = LABEL;
  widget.serialize = false;
  return widget;
}

app.registerExtension({
  name: "unison.planDisplay",
  async nodeCreated(node) {
    if (SHOWS_TEXT.has(node.comfyClass)) addDisplay(node);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null) return;
      addDisplay(this).value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
