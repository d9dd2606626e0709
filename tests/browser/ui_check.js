// Load a UI workflow into a running ComfyUI page in Debian's Chromium, export it with
// app.graphToPrompt(), point it at the tiny test models, queue it from the page and wait until
// the video in TurboDiffusion Save Video plays. Prints one line: RESULT {json}.
//
//   node ui_check.js BASE_URL WORKFLOW.json OUT_PREFIX OVERRIDES_JSON
//
// OVERRIDES_JSON: {"<node id>": {"<widget name>": value, ...}, ...} applied before queueing.
const { chromium } = require("playwright-core");
const fs = require("fs");

const [base, workflowPath, outPrefix, overridesJson] = process.argv.slice(2);
const workflow = JSON.parse(fs.readFileSync(workflowPath, "utf8"));
const overrides = JSON.parse(overridesJson || "{}");
// Noise of the newest frontend itself, seen on every page load (not ours).
const ALLOWED_ERRORS = [/reading 'id'/];

(async () => {
  const t0 = Date.now();
  const result = { errors: [], console: [], external: [], timings: {} };
  // The newest frontend opens a template dialog on a fresh user folder; this marks it as seen.
  await fetch(base + "/settings/Comfy.TutorialCompleted", { method: "POST", body: "true" }).catch(() => {});
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1800, height: 1000 } });
    page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") result.console.push(`${m.type()}: ${m.text()}`); });
    page.on("pageerror", (e) => { if (!ALLOWED_ERRORS.some((r) => r.test(String(e)))) result.errors.push(String(e)); });
    page.on("response", (r) => { if (r.status() >= 400) result.console.push(`HTTP ${r.status()} ${r.url()}`); });
    page.on("request", (r) => {
      const url = r.url();
      if (!url.startsWith(base) && !/^(data|blob):/.test(url)) result.external.push(url);
    });
    await page.goto(base + "/", { waitUntil: "load" });
    await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 60000 });
    result.timings.page = (Date.now() - t0) / 1000;
    result.extensionLoaded = await page.evaluate(async () => {
      const exts = window.app.extensions || window.app.extensionManager?.extensions || [];
      return Array.from(exts).some((e) => e.name === "TurboDiffusion.VideoPreview");
    });

    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);
    await page.waitForTimeout(500);
    result.exported = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    result.nodeTypes = await page.evaluate(() => {
      const g = window.app.graph;
      return (g._nodes || g.nodes).map((n) => [n.id, n.type]);
    });
    await page.screenshot({ path: `${outPrefix}-1-loaded.png` });
    // The newest frontend lists the loaders' properties.models that this server lacks (the real
    // files): that dialog is shown in the first screenshot, then closed.
    result.missingModelsDialog = await page.evaluate(() => /Missing Models/i.test(document.body.innerText));
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);

    // Tiny models and sizes, then queue from the page like a user pressing Queue.
    result.missingWidgets = await page.evaluate((ov) => {
      const missing = [];
      for (const [id, values] of Object.entries(ov)) {
        const node = window.app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {
          const w = node?.widgets?.find((x) => x.name === name);
          if (w) w.value = value; else missing.push(`${id}.${name}`);
        }
      }
      return missing;
    }, overrides);
    result.queued = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const tq = Date.now();
    await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });

    const saveId = Number(Object.entries(result.queued).find(([, n]) => n.class_type === "TurboDiffusionSaveVideo")[0]);
    const loaderId = Number(Object.entries(result.queued).find(([, n]) => n.class_type === "TurboDiffusionModelLoader")[0]);
    await page.waitForFunction((id) => {
      const node = window.app.graph.getNodeById(id);
      const video = document.querySelector(".turbodiffusion-preview video");
      return node?.turbodiffusionFile && video && video.readyState >= 2 && !video.paused && video.currentTime > 0;
    }, saveId, { timeout: 120000 });
    result.timings.run = (Date.now() - tq) / 1000;
    await page.waitForTimeout(700);
    result.video = await page.evaluate((id) => {
      const video = document.querySelector(".turbodiffusion-preview video");
      const link = document.querySelector(".turbodiffusion-preview a");
      const r = video.getBoundingClientRect();
      return {
        file: window.app.graph.getNodeById(id).turbodiffusionFile,
        src: video.currentSrc, autoplay: video.autoplay, loop: video.loop, muted: video.muted,
        paused: video.paused, currentTime: video.currentTime, width: video.videoWidth, height: video.videoHeight,
        visible: r.width > 0 && r.height > 0, link: link?.getAttribute("href"), linkText: link?.textContent,
      };
    }, saveId);
    result.report = await page.evaluate(() =>
      Array.from(document.querySelectorAll(".turbodiffusion-report")).map((e) => e.textContent));
    result.loaderId = loaderId;
    await page.screenshot({ path: `${outPrefix}-2-played.png` });
  } catch (err) {
    result.failure = String(err && err.stack || err);
  } finally {
    await browser.close();
  }
  result.timings.total = (Date.now() - t0) / 1000;
  console.log("RESULT " + JSON.stringify(result));
})();
