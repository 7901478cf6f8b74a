// Unison: show what a node decided (the plan's task and parameters, notes) on the node itself.
//
// The Python nodes return {"ui": {"text": [...]}}; ComfyUI hands that to onExecuted. We put it in a
// read-only text box that is never serialized: not into the saved workflow's widgets_values (so
// saved workflows keep the widget order of the node definition) and not into the API prompt.

import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SHOWS_TEXT = new Set([
  "UnisonPlanner",
  "UnisonTaskRouter",
  "UnisonProjector",
  "UnisonVaceInputs",
  "UnisonVaceSampler",
]);
const WIDGET_NAME = "unison_display";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the workflow's widgets_values
    widget.options = { ...(widget.options ?? {}), serialize: false }; // not in the API prompt
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.8;
      widget.inputEl.title = "What Unison decided (read only)";
    }
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const wanted = node.computeSize();
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    node.setDirtyCanvas?.(true, true);
  });
}

app.registerExtension({
  name: "unison.planDisplay",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null) return;
      showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
