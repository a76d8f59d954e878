// The page's parts shared by the three tasks: the model settings, and a Run (progress, status, cancel) per panel.

import { ApiError, stream } from "./api.js";

export const $ = (id) => document.getElementById(id);
export const png = (b64) => `data:image/png;base64,${b64}`;
export const models = [];

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

export function int(id) {
  return Number.parseInt($(id).value, 10);
}

export function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

/** Fill the sampler, schedule and class choices from the chosen model (GET /models). */
export function showModel() {
  const model = currentModel();
  if (!model) return;
  const sampler = $("sampler");
  const chosen = sampler.value;
  sampler.replaceChildren(...(model.samplers || ["ddim"]).map((s) => el("option", { value: s }, s)));
  sampler.value = (model.samplers || []).includes(chosen) ? chosen : "ddim";
  showSchedules();
  const classes = $("class-label");
  classes.replaceChildren(el("option", { value: "" }, "none (unconditional)"),
    ...(model.class_names || []).map((name, i) => el("option", { value: String(i) }, name)));
  $("conditioning").hidden = !model.conditional;
  // text models: prompt, negative prompt and guidance (default: the pipeline's); latent models: the size in pixels
  $("text-conditioning").hidden = model.conditioning !== "text";
  $("text-guidance").placeholder = `${model.default_guidance_scale ?? 1} (the model's)`;
  $("size").hidden = model.space !== "latent";
  for (const [id, value] of [["width", model.default_size?.[0]], ["height", model.default_size?.[1]]]) {
    $(id).value = value ?? "";
    $(id).step = String(model.size_multiple || 1);
    $(id).min = String(model.size_multiple || 1);
  }
}

/** The schedules of the chosen sampler: DDIM's, or those the multistep solvers define. */
export function showSchedules() {
  const model = currentModel();
  if (!model) return;
  const ddim = $("sampler").value === "ddim";
  $("schedule").replaceChildren(el("option", { value: "" }, "the model's default"),
    ...(ddim ? model.schedules : model.solver_schedules || []).map((s) => el("option", { value: s }, s)));
}

/** The sampler fields of the generating tasks (Generate, Interpolate): ddim's eta applies to ddim only. */
export function samplerFields() {
  const sampler = $("sampler").value || "ddim";
  return sampler === "ddim" ? {} : { sampler };
}

/** The fields every task sends: model, schedule, and class and guidance on a conditional model; prompt, negative
 * prompt and guidance on a text model; the size on a latent model. Invert and Edit always run DDIM, so they send no
 * schedule of another sampler's. */
export function modelFields(task = "generate") {
  const out = {};
  const model = currentModel();
  if (model) out.model = model.name;
  const ddimOnly = task === "invert" || task === "edit";
  if ($("schedule").value && (!ddimOnly || $("sampler").value === "ddim")) out.schedule = $("schedule").value;
  if (model && model.conditional && $("class-label").value !== "") {
    out.class_label = Number($("class-label").value);
    out.guidance_scale = Number($("guidance").value);
  }
  if (model && model.conditioning === "text") {
    out.prompt = $("prompt").value;
    if ($("negative-prompt").value) out.negative_prompt = $("negative-prompt").value;
    if ($("text-guidance").value !== "") out.guidance_scale = Number($("text-guidance").value);
  }
  if (model && model.space === "latent") {
    if ($("width").value) out.width = Number($("width").value);
    if ($("height").value) out.height = Number($("height").value);
  }
  return out;
}

export function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(new ApiError(`The file ${file.name} cannot be read.`));
    reader.readAsDataURL(file);
  });
}

/** One task panel's run: one at a time, streamed, cancellable (aborting the request cancels it on the server). */
export class Run {
  constructor(section) {
    this.section = section;
    this.progress = section.querySelector("progress");
    this.status = section.querySelector(".status");
    this.submit = section.querySelector("button[type=submit]");
    this.cancelButton = section.querySelector("button.cancel");
    this.cancelButton.addEventListener("click", () => this.cancel());
    this.controller = null;
  }

  say(state, text) {
    this.status.dataset.state = state;
    this.status.textContent = text;
  }

  get running() {
    return this.controller !== null;
  }

  cancel() {
    if (this.controller) this.controller.abort();
  }

  /** body: a function giving the request body (may throw an ApiError); onResult(answer) returns the status text. */
  async start(path, body, { onProgress = () => {}, onResult }) {
    if (this.running) return;
    this.controller = new AbortController();
    this.submit.disabled = true;
    this.cancelButton.disabled = false;
    this.progress.max = 1;
    this.progress.value = 0;
    this.say("running", "Starting…");
    try {
      const answer = await stream(path, await body(), {
        signal: this.controller.signal,
        onProgress: (p) => {
          this.progress.max = p.steps;
          this.progress.value = p.step;
          this.say("running", `Step ${p.step} of ${p.steps}`);
          onProgress(p);
        },
      });
      this.progress.value = this.progress.max;
      this.say("done", await onResult(answer));
    } catch (e) {
      if (e.name === "AbortError" || e.cancelled) this.say("cancelled", "Cancelled.");
      else if (e instanceof ApiError) this.say("error", e.message);
      else this.say("error", `Something went wrong in the page: ${e.message}`);
    } finally {
      this.controller = null;
      this.submit.disabled = false;
      this.cancelButton.disabled = true;
    }
  }
}

function loadImage(b64) {
  const image = new Image();
  image.src = png(b64);
  return image.decode().then(() => image);
}

/** The images tiled as the server tiles them (a near-square grid, 2 px black padding; one image alone), as PNG. */
export async function gridBlob(b64s) {
  const images = await Promise.all(b64s.map(loadImage));
  const pad = images.length === 1 ? 0 : 2;
  const { naturalWidth: w, naturalHeight: h } = images[0];
  const cols = Math.ceil(Math.sqrt(images.length));
  const rows = Math.ceil(images.length / cols);
  const canvas = el("canvas", { width: cols * (w + pad) + pad, height: rows * (h + pad) + pad });
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  images.forEach((image, i) => {
    context.drawImage(image, pad + (i % cols) * (w + pad), pad + Math.floor(i / cols) * (h + pad));
  });
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

/** A drop zone for an image file beside its file input: a dropped file goes through the input. */
export function dropTarget(zone, input, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });
  input.addEventListener("change", () => { if (input.files.length) onFile(input.files[0]); });
}
