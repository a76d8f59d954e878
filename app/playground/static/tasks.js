// The three tasks: generate (live previews, the grid with each image's seed, a download), invert (the
// reconstruction, its MSE and x_T's statistics) and interpolate (the frames, animated).

import { ApiError, meanStd, parseNpy } from "./api.js";
import { $, dropTarget, el, fileBase64, gridBlob, int, modelFields, png, Run, samplerFields } from "./ui.js";

const fmt = (x) => Number(x).toPrecision(4);

// -- generate -------------------------------------------------------------------------------------------
export function setUpGenerate() {
  const run = new Run($("generate"));
  const preview = $("gen-preview");
  let download = null;

  function body() {
    const sampler = samplerFields();
    const out = { ...modelFields(), ...sampler, steps: int("gen-steps"), n: int("gen-n"),
      preview_every: int("gen-preview-every") || 0 };
    if (!sampler.sampler) out.eta = Number($("gen-eta").value);  // the multistep samplers are deterministic
    if ($("gen-seed").value.trim() !== "") out.seed = Number($("gen-seed").value);
    return out;
  }

  function onProgress(p) {
    if (!p.preview) return;
    preview.src = png(p.preview);
    preview.dataset.previews = String(Number(preview.dataset.previews) + 1);
    preview.closest("figure").hidden = false;
  }

  async function onResult(answer) {
    const { images, seed } = answer;
    $("gen-results").replaceChildren(...images.map((b64, i) => el("figure", {},
      el("a", { href: png(b64), download: `ddim-seed-${seed + i}.png`, title: `Download seed ${seed + i}` },
        el("img", { src: png(b64), alt: `sample of seed ${seed + i}` })),
      el("figcaption", {}, `seed ${seed + i}`))));
    if (download) URL.revokeObjectURL(download);
    download = URL.createObjectURL(await gridBlob(images));
    const link = $("gen-download");
    Object.assign(link, { href: download, download: `ddim-${answer.model}-seed-${seed}-n${images.length}.png` });
    link.hidden = false;
    const seeds = images.length === 1 ? `seed ${seed}` : `seeds ${seed} to ${seed + images.length - 1}`;
    return `Done: ${images.length} image${images.length === 1 ? "" : "s"}, ${seeds}.`;
  }

  $("generate-form").addEventListener("submit", (e) => {
    e.preventDefault();
    preview.dataset.previews = "0";
    run.start("generate", body, { onProgress, onResult });
  });
  return run;
}

// -- invert ---------------------------------------------------------------------------------------------

export function setUpInvert() {
  const run = new Run($("invert"));
  const input = $("invert-file");
  let shown = null;
  dropTarget($("invert-drop"), input, (file) => {
    if (shown) URL.revokeObjectURL(shown);
    shown = URL.createObjectURL(file);
    $("inv-original").src = shown;
    $("inv-reconstruction").removeAttribute("src");
    $("invert").querySelector(".pair").hidden = false;
    $("inv-stats").hidden = true;
  });

  async function body() {
    if (!input.files.length) throw new ApiError("Choose or drop an image to invert first.");
    return { ...modelFields("invert"), images: [await fileBase64(input.files[0])], steps: int("inv-steps"),
      return_reconstruction: true };
  }

  function onResult(answer) {
    $("inv-reconstruction").src = png(answer.reconstruction[0]);
    const mse = answer.reconstruction_mse[0];
    $("inv-mse").textContent = `${fmt(mse)} (per pixel, pixels in [0, 1])`;
    const x = parseNpy(answer.x_T);
    const { mean, std } = meanStd(x.data);
    $("inv-xt").textContent = `shape ${x.shape.join("×")}, mean ${fmt(mean)}, std ${fmt(std)}`;
    $("inv-stats").hidden = false;
    return `Done: inverted with S = ${answer.steps}; reconstruction MSE ${fmt(mse)}.`;
  }

  $("invert-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run.start("invert", body, { onResult });
  });
  return run;
}

// -- interpolate ----------------------------------------------------------------------------------------
export function setUpInterpolate() {
  const run = new Run($("interpolate"));
  const animation = $("int-animation");
  let timer = null;
  let frames = [];
  let shown = 0;

  for (const end of ["start", "end"]) {
    const pick = (kind) => { document.querySelector(`input[name=${end}-kind][value=${kind}]`).checked = true; };
    $(`${end}-file`).addEventListener("change", () => pick("image"));
    $(`${end}-seed`).addEventListener("input", () => pick("seed"));
    dropTarget($(`${end}-end`), $(`${end}-file`), () => {});
  }

  async function endpoint(end) {
    const kind = document.querySelector(`input[name=${end}-kind]:checked`).value;
    if (kind === "seed") return { seed: int(`${end}-seed`) };
    const file = $(`${end}-file`).files[0];
    if (!file) throw new ApiError(`Choose the ${end} image, or pick a seed for the ${end}.`);
    return { image: await fileBase64(file) };
  }

  async function body() {
    return { ...modelFields(), ...samplerFields(), start: await endpoint("start"), end: await endpoint("end"),
      frames: int("int-frames"),
      steps: int("int-steps"), method: $("int-method").value };
  }

  function show(i) {
    shown = i;
    animation.src = png(frames[i]);
    animation.dataset.frame = String(i);
    $("int-frame-label").textContent = `frame ${i + 1} of ${frames.length}`;
  }

  function play(on) {
    clearInterval(timer);
    timer = on ? setInterval(() => show((shown + 1) % frames.length), 150) : null;
    $("int-play").textContent = on ? "Pause" : "Play";
  }

  function onResult(answer) {
    frames = answer.images;
    $("int-frames-strip").replaceChildren(...frames.map((b64, i) => el("figure", {},
      el("img", { src: png(b64), alt: `frame ${i + 1}` }), el("figcaption", {}, `${i + 1}`))));
    show(0);
    play(true);
    animation.closest(".animation").hidden = false;
    return `Done: ${frames.length} frames (${answer.method}), S = ${answer.steps}.`;
  }

  $("int-play").addEventListener("click", () => play(timer === null));
  $("interpolate-form").addEventListener("submit", (e) => {
    e.preventDefault();
    play(false);
    run.start("interpolate", body, { onResult });
  });
  return run;
}
