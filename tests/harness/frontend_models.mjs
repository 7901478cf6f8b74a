// What ComfyUI's missing-models warning offers for each shipped workflow on a fresh install (no model files).
//
//   NODE_PATH=<dir with node_modules/playwright-core> node frontend_models.mjs http://127.0.0.1:8190 OUTDIR a.json ...
//
// Loads each workflow with the warning on (Comfy.Workflow.ShowMissingModelsWarning) and reports, per
// workflow, which of the given model names the page then shows, and a screenshot. Run by
// tests/harness/live_comfyui.py --frontend after it moved the model files away.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require(require.resolve("playwright-core", { paths: (process.env.NODE_PATH || "").split(":") }));

const [server, outdir, ...files] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const report = { workflows: {}, screenshots: [] };
for (const file of files) {
  // each workflow in a new browser context, as a user opening it (no dialog left from the one before)
  const context = await browser.newContext({ viewport: { width: 1600, height: 900 } });
  const page = await context.newPage();
  await page.goto(server, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null,
                             { timeout: 120000 });
  report.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  await page.evaluate(async () => {
    await window.app.extensionManager.setting.set("Comfy.Workflow.ShowMissingModelsWarning", true);
  });
  const workflow = JSON.parse(readFileSync(file, "utf8"));
  const names = [...new Set([...(workflow.models ?? []), ...workflow.nodes.flatMap((n) => n.properties?.models ?? [])]
    .map((m) => m.name))];
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
  await sleep(3000);
  // 1.58 reports missing models as "issues" on a toast; its details panel lists the files
  const details = page.getByRole("button", { name: "View details" });
  if (await details.count()) {
    await page.keyboard.press("Escape"); // a first-visit dialog (templates) may sit over it
    await sleep(500);
    await details.first().click({ timeout: 10000 }).catch(() => {});
    await sleep(1500);
  }
  const text = await page.evaluate(() => document.body.innerText);
  const name = file.split("/").pop().replace(".json", "");
  const path = join(outdir, `missing-models-${name}.png`);
  await page.screenshot({ path });
  report.screenshots.push(path);
  report.workflows[name] = { declared: names, shown: names.filter((n) => text.includes(n)),
                             downloadButtons: (text.match(/Download/g) ?? []).length };
  await context.close();
}
console.log(JSON.stringify(report));
await browser.close();
