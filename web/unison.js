// Unison: show what a node decided (the plan's task and parameters, notes) on the node itself.
//
// The Python nodes return {"ui": {"text": [...]}}; ComfyUI hands that to onExecuted. The text goes
// into a read-only box, headed "Unison decided", that the pack owns (a DOM widget: node.addDOMWidget, the frontend's public API),
// with a fixed height (the frontend sizes the element from getHeight/getMinHeight/getMaxHeight) that
// the shipped workflows reserve (tests/harness/build_workflows.py DISPLAY_HEIGHT), so the node never
// grows over its neighbours; long text scrolls. The widget is
// never serialized: not into the saved workflow's widgets_values (it is the last widget, so the
// node definition's widget order is kept) and not into the API prompt.
//
// A node whose result ComfyUI reuses from its cache does not run, and ComfyUI sends "executed" only
// for nodes that run and for output nodes (execution.py), so a run where the planner's decision was
// cached (e.g. after reloading the page) would leave the box empty. ComfyUI lists the cached nodes in
// "execution_cached" and keeps their ui output in the prompt's history entry: after the run, the box
// of each cached node shows that text. Only app.js / api.js (the frontend's public modules) are used.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

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
  // The label is part of the box: neither view draws a DOM widget's label (the Nodes 2.0 view of 1.58 shows
  // none, the classic view never did), so without it the box would be an unlabelled block of text.
  const box = document.createElement("div");
  box.className = "unison-display";
  box.setAttribute("role", "status");
  box.setAttribute("aria-label", LABEL);
  box.title = `${LABEL} (read only)`;
  Object.assign(box.style, {
    display: "flex",
    flexDirection: "column",
    boxSizing: "border-box",
    width: "100%",
    height: "100%",
    overflow: "hidden",
    borderRadius: "4px",
    background: "var(--comfy-input-bg, #222)",
    opacity: "0.85",
  });
  const caption = document.createElement("div");
  caption.className = "unison-display-label";
  caption.textContent = LABEL;
  Object.assign(caption.style, {
    flex: "0 0 auto",
    padding: "2px 6px 0",
    fontFamily: "sans-serif",
    fontSize: "10px",
    lineHeight: "1.4",
    color: "var(--descrip-text, #999)",
    userSelect: "none",
  });
  const text = document.createElement("pre"); // text, not an input: read only in every view
  text.className = "unison-display-text";
  text.textContent = PLACEHOLDER;
  Object.assign(text.style, {
    flex: "1 1 auto",
    minHeight: "0",
    margin: "0",
    padding: "2px 6px 4px",
    overflow: "auto",
    whiteSpace: "pre-wrap",
    wordBreak: "break-word",
    fontFamily: "monospace",
    fontSize: "11px",
    lineHeight: "1.35",
    color: "var(--input-text, #ddd)",
    userSelect: "text",
  });
  box.append(caption, text);
  const widget = node.addDOMWidget(WIDGET_NAME, "unison-display", box, {
    serialize: false,
    hideOnZoom: true,
    getValue: () => text.textContent,
    setValue: (value) => {
      text.textContent = value ?? "";
    },
    getMinHeight: () => DISPLAY_HEIGHT,
    getMaxHeight: () => DISPLAY_HEIGHT,
    getHeight: () => DISPLAY_HEIGHT,
  });
  widget.label = LABEL;
  widget.serialize = false;
  return widget;
}

function show(node, text) {
  if (text == null || !SHOWS_TEXT.has(node?.comfyClass)) return;
  addDisplay(node).value = Array.isArray(text) ? text.join("\n") : String(text);
  node.setDirtyCanvas?.(true, true);
}

const cachedByPrompt = new Map(); // prompt id -> ids of the nodes ComfyUI did not run (cached)

function graphNode(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id) ?? null;
}

async function historyOutputs(promptId) {
  // The history entry is written just after "execution_success" is sent: ask a few times.
  for (let attempt = 0; attempt < 20; attempt++) {
    const response = await api.fetchApi(`/history/${encodeURIComponent(promptId)}`);
    if (response.ok) {
      const entry = (await response.json())[promptId];
      if (entry) return entry.outputs ?? {};
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return {};
}

async function showCached({ detail }) {
  const promptId = detail?.prompt_id;
  const cached = cachedByPrompt.get(promptId);
  cachedByPrompt.delete(promptId);
  const ours = (cached ?? []).map((id) => [id, graphNode(id)]).filter(([, node]) => SHOWS_TEXT.has(node?.comfyClass));
  if (!ours.length) return;
  const outputs = await historyOutputs(promptId);
  for (const [id, node] of ours) show(node, outputs[id]?.text);
}

app.registerExtension({
  name: "unison.planDisplay",
  async setup() {
    api.addEventListener("execution_cached", ({ detail }) => {
      if (detail?.prompt_id) cachedByPrompt.set(detail.prompt_id, detail.nodes ?? []);
    });
    api.addEventListener("execution_success", (event) => {
      showCached(event).catch((error) => console.debug("unison.planDisplay: no cached plan text", error));
    });
    for (const end of ["execution_error", "execution_interrupted"]) {
      api.addEventListener(end, ({ detail }) => cachedByPrompt.delete(detail?.prompt_id));
    }
  },
  async nodeCreated(node) {
    if (SHOWS_TEXT.has(node.comfyClass)) addDisplay(node);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      show(this, message?.text);
    };
  },
});
