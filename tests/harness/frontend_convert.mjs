// Convert UI-format workflows to API prompts with ComfyUI's real frontend (headless Chromium).
//
//   NODE_PATH=<dir with node_modules/playwright-core> node frontend_convert.mjs http://127.0.0.1:8190 a.json b.json
//
// For each file: app.loadGraphData(workflow), then app.graphToPrompt() (what "Queue" sends) and
// app.graph.serialize() (what "Save" writes). Prints {"<file>": {"output": ..., "workflow": ...,
// "errors": [...]}} as JSON on stdout. Also reports console errors of the page (e.g. a failing
// extension script). Run by tests/harness/live_comfyui.py --frontend.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require(require.resolve("playwright-core", { paths: (process.env.NODE_PATH || "").split(":") }));

const [server, ...files] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage();
const consoleErrors = [];
const consoleWarnings = [];
page.on("console", (msg) => {
  const line = `${msg.text()} @ ${msg.location()?.url ?? ""}`;
  if (msg.type() === "error") consoleErrors.push(line);
  if (msg.type() === "warning") consoleWarnings.push(line);
});
page.on("response", (r) => { if (r.status() >= 400) consoleErrors.push(`HTTP ${r.status()} ${r.url()}`); });
page.on("pageerror", (err) => consoleErrors.push(String(err)));
await page.goto(server, { waitUntil: "load", timeout: 120000 });
await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 120000 });
const extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));

const results = {};
for (const file of files) {
  const workflow = JSON.parse(readFileSync(file, "utf8"));
  results[file] = await page.evaluate(async (wf) => {
    await window.app.loadGraphData(wf, true, true, "check");
    const prompt = await window.app.graphToPrompt();
    return { output: prompt.output, workflow: window.app.graph.serialize() };
  }, workflow);
}
// The plan display: feed a Planner node the ui message ComfyUI sends after execution, then check the
// text box shows it and stays out of both the saved workflow and the API prompt.
const display = await page.evaluate(async (wf) => {
  await window.app.loadGraphData(wf, true, true, "display");
  const node = window.app.graph._nodes.find((n) => n.type === "UnisonPlanner");
  const before = node.widgets.length;
  node.onExecuted({ text: ["task: text_to_video → video\ndecided by: rules"] });
  const widget = node.widgets.find((w) => w.name === "unison_display");
  const saved = window.app.graph.serialize().nodes.find((n) => n.id === node.id).widgets_values;
  const prompt = await window.app.graphToPrompt();
  const element = widget?.element;
  return { before, after: node.widgets.length, value: widget?.value, saved, label: widget?.label,
           readOnly: !!element && !element.isContentEditable && !["INPUT", "TEXTAREA"].includes(element.tagName),
           inPrompt: "unison_display" in prompt.output[String(node.id)].inputs };
}, JSON.parse(readFileSync(files[0], "utf8")));
console.log(JSON.stringify({ results, consoleErrors, consoleWarnings, extensions, display }));
await browser.close();
