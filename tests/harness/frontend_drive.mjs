// Drive ComfyUI's editor as a user would (headless Chromium), then report what happened as JSON.
//
//   NODE_PATH=<dir with node_modules/playwright-core> node frontend_drive.mjs http://127.0.0.1:8190 OUTDIR auto.json [more.json ...]
//
// 0. opens the template browser on the pack's entry (thumbnails served and shown; a screenshot);
// 1. opens the workflow and takes a screenshot at its saved view;
// 2. bypasses the Planner Loader (click its title, Ctrl+B), then sets widgets by clicking them and
//    typing: Router width/height (number prompt: type, Enter), Router frames (the list's filter box:
//    type, Enter), the video Sampler's steps and guidance; reads the values back;
// 3. queues with Ctrl+Enter, waits for the run, takes a screenshot with the Router in view, and
//    measures the plan display box against its node;
//    reads the plan boxes (they must show what the run decided), reloads the graph (fresh boxes) and
//    queues it again: every node is cached then, and the boxes must still show the decision;
// 4. with the frontend's "Nodes 2.0" view (Comfy.VueNodes.Enabled, where it exists) reloads the
//    workflow, takes a screenshot and measures the display boxes against their nodes again;
// 5. loads every workflow given in both views and reports each node's box on the page (the canvas
//    drawn at scale 1 in a window large enough that no node is culled), for the overlap check.
// Console errors and warnings are collected throughout. Run by tests/harness/live_comfyui.py --frontend.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require(require.resolve("playwright-core", { paths: (process.env.NODE_PATH || "").split(":") }));

const [server, outdir, file, ...others] = process.argv.slice(2);
const workflow = JSON.parse(readFileSync(file, "utf8"));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
const console_ = { errors: [], warnings: [] };
page.on("console", (msg) => {
  const line = `${msg.text()} @ ${msg.location()?.url ?? ""}`;
  if (msg.type() === "error") console_.errors.push(line);
  if (msg.type() === "warning") console_.warnings.push(line);
});
page.on("pageerror", (err) => console_.errors.push(String(err)));
const report = { steps: [], screenshots: [], console: console_ };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const shot = async (name) => {
  const path = join(outdir, name);
  await page.screenshot({ path });
  report.screenshots.push(path);
};

// Node boxes in graph units as the page draws them (DOM nodes in the Nodes 2.0 view, the canvas otherwise).
async function readBoxes(page) {
  return await page.evaluate(() => {
    const app = window.app;
    const rect = app.canvas.canvas.getBoundingClientRect();
    return app.graph._nodes.map((node) => {
      const el = document.querySelector(`[data-node-id="${node.id}"]`);
      if (el) {
        const r = el.getBoundingClientRect();
        const [x0, y0] = app.canvas.ds.convertCanvasToOffset([r.left - rect.left, r.top - rect.top]);
        const [x1, y1] = app.canvas.ds.convertCanvasToOffset([r.right - rect.left, r.bottom - rect.top]);
        return { id: node.id, type: node.type, box: [x0, y0, x1, y1], drawn: r.width > 0 };
      }
      const b = node.getBounding ? node.getBounding() : [node.pos[0], node.pos[1] - 30, node.size[0], node.size[1] + 30];
      return { id: node.id, type: node.type, box: [b[0], b[1], b[0] + b[2], b[1] + b[3]], drawn: true };
    });
  });
}

// Every workflow in every view, as a user opens it: each in a fresh browser context, before any run (a run's outputs,
// such as answer text and video previews, make nodes grow; and 1.27.10's Nodes 2.0 view keeps the node
// sizes of the graph shown before when another is loaded into the same page, by node id). Node boxes
// in graph units, read from the page.
async function measureLayouts(hasVue) {
  const layouts = {};
  for (const vue of hasVue ? [false, true] : [false]) {
    for (const path of [file, ...others]) {
      // a new browser context: no workflow restored from the last page's storage
      const context = await browser.newContext({ viewport: { width: 4800, height: 2400 } });
      const page = await context.newPage();
      await page.goto(server, { waitUntil: "load", timeout: 120000 });
      await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null,
                                 { timeout: 120000 });
      const wf = JSON.parse(readFileSync(path, "utf8"));
      await page.evaluate(async ({ wf, key, vue, hasVue }) => {
        // Loaded in the classic view, then switched: 1.27.10's Nodes 2.0 view, when on while a graph loads
        // into a fresh page, keeps drawing the default graph's nodes at the new graph's positions.
        await window.app.extensionManager.setting.set("Comfy.Workflow.ShowMissingModelsWarning", false);
        if (hasVue) await window.app.extensionManager.setting.set(key, false);
        await window.app.loadGraphData(wf);
        await new Promise((resolve) => setTimeout(resolve, 1500));
        if (hasVue && vue) await window.app.extensionManager.setting.set(key, true);
        window.app.canvas.ds.scale = 1;
        window.app.canvas.ds.offset = [40, 80];
        window.app.canvas.setDirty(true, true);
      }, { wf, key: VUE, vue, hasVue });
      // The page settles its layout over a few frames (slower on a loaded machine): measure until two
      // readings half a second apart agree.
      let boxes = null;
      for (let attempt = 0; attempt < 40; attempt++) {
        await sleep(500);
        const now = await readBoxes(page);
        if (attempt >= 3 && JSON.stringify(now) === JSON.stringify(boxes)) break;
        boxes = now;
      }
      layouts[`${vue ? "Nodes 2.0" : "classic"} ${path.split("/").pop()}`] = boxes;
      if (hasVue && vue) await page.evaluate(async (key) => { await window.app.extensionManager.setting.set(key, false); }, VUE);
      await context.close();
    }
  }
  return layouts;
}

// The template browser as a user opens it (Templates, then the pack's entry under custom nodes): which of the
// pack's thumbnails the server sent and how many card pictures the dialog shows loaded (the frontend fetches
// each .jpg and shows it from a blob: URL).
async function templateCards(pack) {
  const context = await browser.newContext({ viewport: { width: 1600, height: 900 } });
  const page = await context.newPage();
  page.on("console", (msg) => {
    const line = `${msg.text()} @ ${msg.location()?.url ?? ""}`;
    if (msg.type() === "error") console_.errors.push(line);
    if (msg.type() === "warning") console_.warnings.push(line);
  });
  const served = {};
  page.on("response", (r) => {
    const m = r.url().match(new RegExp(`/api/workflow_templates/${pack}/([^/?]+)\\.jpg`));
    if (m) served[decodeURIComponent(m[1])] = r.status();
  });
  await page.goto(server, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null,
                             { timeout: 120000 });
  await sleep(2000);
  await page.keyboard.press("Escape"); // a first-visit dialog
  await page.evaluate(async () => { await window.app.extensionManager.command.execute("Comfy.BrowseTemplates"); });
  await sleep(2500);
  await page.getByText(pack, { exact: true }).first().click({ timeout: 10000 });
  let shown = 0;
  for (let attempt = 0; attempt < 20 && shown < 1; attempt++) {
    await sleep(500);
    shown = await page.evaluate(() => [...document.querySelectorAll("[role=dialog] img")]
      .filter((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0).length);
  }
  await sleep(1500);
  shown = await page.evaluate(() => [...document.querySelectorAll("[role=dialog] img")]
    .filter((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0).length);
  const path = join(outdir, "0-templates.png");
  await page.screenshot({ path });
  report.screenshots.push(path);
  await context.close();
  return { served, shown };
}

try {
  report.templates = await templateCards("ComfyUI-Unison"); // the folder live_comfyui.py links the pack as
} catch (err) {
  report.templates = { error: String(err?.stack ?? err) };
}
await page.goto(server, { waitUntil: "load", timeout: 120000 });
await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null, { timeout: 120000 });
report.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
const VUE = "Comfy.VueNodes.Enabled"; // the "Nodes 2.0" view; absent from frontends without it
const hasVue = await page.evaluate((key) => {
  try { return window.app.extensionManager.setting.get(key) !== undefined; } catch { return false; }
}, VUE);
report.layouts = await measureLayouts(hasVue);
await page.evaluate(async ({ key, hasVue }) => {
  const settings = window.app.extensionManager.setting;
  await settings.set("Comfy.Workflow.ShowMissingModelsWarning", false);
  if (hasVue) await settings.set(key, false); // start in the classic view
}, { key: VUE, hasVue });
await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
await sleep(1500);
await shot("1-saved-view.png");

// Where a widget (or a node's title) is on the screen, with the node centred at scale 1.
async function point(title, widget, fx = 0.5) {
  return await page.evaluate(({ title, widget, fx }) => {
    const app = window.app;
    const node = app.graph._nodes.find((n) => n.title === title || n.type === title);
    app.canvas.ds.scale = 1;
    const rect = app.canvas.canvas.getBoundingClientRect();
    app.canvas.ds.offset = [rect.width / 2 - node.pos[0] - node.size[0] / 2, rect.height / 2 - node.pos[1] - node.size[1] / 2];
    app.canvas.setDirty(true, true);
    let y = -15; // the title bar
    if (widget) {
      const w = node.widgets.find((x) => x.name === widget);
      y = (w.last_y ?? w.y) + 10;
    }
    const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] * fx, node.pos[1] + y]);
    return [rect.left + cx, rect.top + cy];
  }, { title, widget, fx });
}

async function typeNumber(title, widget, value) {
  const [x, y] = await point(title, widget);
  await sleep(300);
  await page.mouse.click(x, y);
  await sleep(400);
  await page.keyboard.press("Control+A");
  await page.keyboard.type(String(value));
  await page.keyboard.press("Enter");
  await sleep(300);
  report.steps.push(`typed ${value} into ${title}.${widget}`);
}

async function pickFromList(title, widget, value) {
  const [x, y] = await point(title, widget);
  await sleep(300);
  await page.mouse.click(x, y);
  await sleep(500);
  await page.keyboard.type(String(value)); // the list's filter box has the focus
  await sleep(300);
  await page.keyboard.press("Enter");
  await sleep(300);
  report.steps.push(`picked ${value} from ${title}.${widget}`);
}

async function waitForRun(before) {
  return await page.evaluate(async (before) => {
    for (let i = 0; i < 600; i++) {
      const history = await (await fetch("/history")).json();
      const ids = Object.keys(history);
      if (ids.length > before) return history[ids[ids.length - 1]];
      await new Promise((r) => setTimeout(r, 500));
    }
    return null;
  }, before);
}

// What each plan box shows, by node title.
const displayTexts = async () => await page.evaluate(() => Object.fromEntries(window.app.graph._nodes
  .map((n) => [n.title, n.widgets?.find((w) => w.name === "unison_display")?.value])
  .filter(([, text]) => text !== undefined)));

const values = async () => await page.evaluate(() => {
  const out = {};
  for (const n of window.app.graph._nodes) {
    out[n.title] = { mode: n.mode, ...Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value])) };
  }
  return out;
});

try {
  const [tx, ty] = await point("Unison Planner Loader");
  await sleep(500); // let the canvas draw the new view before clicking into it
  await page.mouse.click(tx + 60, ty);
  await page.keyboard.press("Control+b");
  await sleep(300);
  const bypassed = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.mode === 4).map((n) => n.title));
  report.steps.push(`Ctrl+B on the Unison Planner Loader's title; bypassed now: ${bypassed.join(", ")}`);
  await typeNumber("Unison Task Router", "width", 32);
  await typeNumber("Unison Task Router", "height", 32);
  await pickFromList("Unison Task Router", "frames", 9);
  await typeNumber("Unison VACE Sampler (video)", "steps", 2);
  await typeNumber("Unison VACE Sampler (video)", "guidance", 1);
  report.values = await values();
  await shot("2-widgets-set.png");

  const before = await page.evaluate(async () => Object.keys(await (await fetch("/history")).json()).length);
  await page.mouse.click(5, 450); // focus the canvas, nothing selected
  await page.keyboard.press("Control+Enter");
  report.steps.push("queued with Ctrl+Enter");
  report.history = await waitForRun(before);
  await sleep(1000);
  await point("Unison Task Router");
  await sleep(500);
  report.displaysAfterRun = await displayTexts();
  await shot("3-after-run-router.png");
  // The same graph again in fresh nodes: ComfyUI reuses every result, so no node of ours runs.
  await page.evaluate(async () => { await window.app.loadGraphData(window.app.graph.serialize()); });
  await sleep(1500);
  report.displaysBeforeCachedRun = await displayTexts();
  const count = await page.evaluate(async () => Object.keys(await (await fetch("/history")).json()).length);
  await page.mouse.click(5, 450);
  await page.keyboard.press("Control+Enter");
  report.steps.push("reloaded the graph and queued it again with Ctrl+Enter (everything cached)");
  report.cachedHistory = await waitForRun(count);
  await sleep(2500);
  report.displaysAfterCachedRun = await displayTexts();
  await point("Unison VACE Sampler (video)");
  await sleep(500);
  await shot("4-after-run-sampler.png");
} catch (err) {
  report.error = String(err?.stack ?? err);
}

// The plan display boxes against their nodes, on the screen, in the view that is on.
async function measureDisplays() {
  return await page.evaluate(() => {
    const app = window.app;
    const rect = app.canvas.canvas.getBoundingClientRect();
    const out = [];
    for (const node of app.graph._nodes) {
      const widget = node.widgets?.find((w) => w.name === "unison_display");
      if (!widget) continue;
      const el = widget.element;
      const box = el?.getBoundingClientRect();
      const vueNode = el?.closest?.("[data-node-id]");
      let nodeBox;
      if (vueNode) {
        const r = vueNode.getBoundingClientRect();
        nodeBox = [r.left, r.top, r.right, r.bottom];
      } else {
        const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - 30]);
        const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
        nodeBox = [rect.left + x0, rect.top + y0, rect.left + x1, rect.top + y1];
      }
      const visible = !!box && box.width > 0 && box.height > 0 && getComputedStyle(el).display !== "none";
      // the label as drawn: an element of the box showing exactly it, inside the box (the text itself may
      // contain the words, e.g. the placeholder, so the box's whole text proves nothing)
      const shownLabel = [...(el?.querySelectorAll("*") ?? [])].some((e) => {
        const r = e.getBoundingClientRect();
        return e.children.length === 0 && e.textContent.trim() === "Unison decided" && (!visible || (r.height > 0
          && r.top >= box.top - 1 && r.bottom <= box.bottom + 1));
      });
      const text = el?.querySelector("pre") ?? el; // where the plan text scrolls
      out.push({
        node: node.title, label: widget.label, shownLabel, visible,
        readOnly: !!el && !el.isContentEditable && !["INPUT", "TEXTAREA"].includes(el.tagName) && !el.querySelector("input,textarea,[contenteditable=true]"),
        clipped: !!text && ((text.scrollHeight > text.clientHeight && getComputedStyle(text).overflowY === "visible")
          || (visible && text.getBoundingClientRect().bottom > box.bottom + 1)),
        box: box ? [box.left, box.top, box.right, box.bottom] : null, nodeBox,
        inside: !visible || (box.left >= nodeBox[0] - 1 && box.top >= nodeBox[1] - 1 && box.right <= nodeBox[2] + 1 && box.bottom <= nodeBox[3] + 1),
      });
    }
    return out;
  });
}
await page.evaluate(() => { window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [40, 80]; window.app.canvas.setDirty(true, true); });
await sleep(800);
report.classic = await measureDisplays();
await shot("5-classic-view.png");

if (hasVue) {
  await page.evaluate(async ({ wf, key }) => {
    await window.app.extensionManager.setting.set(key, true);
    await window.app.loadGraphData(wf);
  }, { wf: workflow, key: VUE });
  await sleep(2500);
  await page.evaluate(() => { window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [-560, 80]; window.app.canvas.setDirty(true, true); });
  await sleep(1500);
  report.vue = await measureDisplays();
  report.vueNodes = await page.evaluate(() => {
    const boxes = [...document.querySelectorAll("[data-node-id]")].map((e) => {
      const r = e.getBoundingClientRect();
      return { id: e.getAttribute("data-node-id"), box: [r.left, r.top, r.right, r.bottom] };
    });
    return boxes;
  });
  await point("Unison Task Router"); // the Router and its plan box in the middle of the window, at scale 1
  await sleep(1500);
  await shot("6-nodes-2.0-view.png");
  await page.evaluate(async (key) => { await window.app.extensionManager.setting.set(key, false); }, VUE);
}


console.log(JSON.stringify(report));
await browser.close();
