// ComfyUI-TurboDiffusion frontend: plays saved videos inside TurboDiffusion Save Video, and shows
// the model loader's report on the loader node. Works with the 2024 litegraph UI and the newest
// frontend: it only uses app.registerExtension, onExecuted and addDOMWidget, which both have.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAVE_NODE = "TurboDiffusionSaveVideo";
const LOADER_NODE = "TurboDiffusionModelLoader";
const PREVIEW = "turbodiffusion_preview";
const REPORT = "turbodiffusion_report";
const LINK_HEIGHT = 22;
const MARGIN = 20; // the 2024 UI draws a DOM widget 10 px inside its slot on each side

function viewUrl(file) {
  const query = new URLSearchParams({
    filename: file.filename,
    subfolder: file.subfolder ?? "",
    type: file.type ?? "output",
    t: String(Date.now()), // a re-run may save under a name the browser has cached
  });
  return api.apiURL(`/view?${query}`);
}

function isVideo(file) {
  return /^video\//.test(file.format ?? "") || /\.(mp4|webm)$/i.test(file.filename ?? "");
}

// A DOM widget that is never part of the prompt or of the saved workflow's values.
function domWidget(node, name, element, height) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (widget) return widget;
  widget = node.addDOMWidget(name, name, element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => widget.turboHeight ?? 0,
    getHeight: () => widget.turboHeight ?? 0,
  });
  widget.serialize = false;
  widget.turboHeight = height; // our own name: the newest frontend's widgets have a read-only `height`
  return widget;
}

function fitNode(node) {
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
  node.setDirtyCanvas?.(true, true);
  app.graph.setDirtyCanvas(true, true);
}

function showSaved(node, files) {
  const file = files[files.length - 1];
  if (!file) return;
  const box = document.createElement("div");
  box.className = "turbodiffusion-preview";
  box.style.overflow = "hidden";
  const widget = domWidget(node, PREVIEW, box, 240);
  // The UI owns the widget element's display style (it hides it when zoomed out): lay out inside.
  const inner = document.createElement("div");
  Object.assign(inner.style, { display: "flex", flexDirection: "column", alignItems: "stretch", height: "100%" });
  (widget.element ?? box).replaceChildren(inner);

  const url = viewUrl(file);
  let media;
  if (isVideo(file)) {
    media = document.createElement("video");
    Object.assign(media, { autoplay: true, loop: true, muted: true, playsInline: true, controls: true });
    media.setAttribute("muted", "");
    media.addEventListener("loadedmetadata", () => resize(media.videoWidth, media.videoHeight));
  } else {
    media = document.createElement("img");
    media.addEventListener("load", () => resize(media.naturalWidth, media.naturalHeight));
  }
  media.className = "turbodiffusion-media";
  Object.assign(media.style, { width: "100%", height: "0", minHeight: "0", flex: "1 1 0", objectFit: "contain" });
  media.src = url;

  const link = document.createElement("a");
  link.className = "turbodiffusion-link";
  link.href = url;
  link.target = "_blank";
  link.download = file.filename;
  link.textContent = [file.subfolder, file.filename].filter(Boolean).join("/");
  Object.assign(link.style, {
    color: "var(--input-text, #ddd)", fontSize: "12px", height: `${LINK_HEIGHT}px`, lineHeight: `${LINK_HEIGHT}px`,
    overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap", flex: "0 0 auto",
  });

  inner.replaceChildren(media, link);
  node.turbodiffusionFile = file; // for tests and other extensions

  function resize(w, h) {
    if (!w || !h) return;
    const width = Math.max(node.size[0] - 20, 64);
    widget.turboHeight = Math.round((width * h) / w) + LINK_HEIGHT + MARGIN;
    fitNode(node);
  }
  if (isVideo(file)) media.play?.().catch(() => {}); // autoplay may need a nudge once muted is set
  fitNode(node);
}

function showReport(node, lines) {
  const text = lines.join("\n");
  let widget = node.widgets?.find((w) => w.name === REPORT);
  if (!widget) {
    const box = document.createElement("div");
    box.className = "turbodiffusion-report";
    Object.assign(box.style, {
      fontSize: "11px", fontFamily: "monospace", whiteSpace: "pre-wrap", overflow: "hidden",
      color: "var(--descrip-text, #999)", lineHeight: "14px",
    });
    widget = domWidget(node, REPORT, box, 0);
  }
  (widget.element ?? widget.inputEl).textContent = text;
  widget.turboHeight = 14 * text.split("\n").length + MARGIN + 4;
  fitNode(node);
}

app.registerExtension({
  name: "TurboDiffusion.VideoPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SAVE_NODE && nodeData.name !== LOADER_NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      if (nodeData.name === SAVE_NODE && output?.videos?.length) showSaved(this, output.videos);
      if (nodeData.name === LOADER_NODE && output?.text?.length) showReport(this, output.text);
    };
  },
});
