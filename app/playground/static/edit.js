// The Edit task: a dropped image inverted under its source class (or prompt) for k = int(S x strength) steps,
// then generated back under the target (the model settings' class or prompt); the source, the edit, and a sweep
// over strengths side by side.

import { ApiError, send } from "./api.js";
import { $, currentModel, dropTarget, el, fileBase64, modelFields, png, Run } from "./ui.js";

const SWEEP = [0.3, 0.5, 0.7, 0.9, 1];

/** The source choices of the chosen model: its classes, or a source prompt on a text model. */
export function showEditSource() {
  const model = currentModel();
  if (!model) return;
  $("edit-source-class").replaceChildren(el("option", { value: "" }, "none (unconditional)"),
    ...(model.class_names || []).map((name, i) => el("option", { value: String(i) }, name)));
  $("edit-source-class-label").hidden = !model.conditional;
  $("edit-source-prompt-label").hidden = model.conditioning !== "text";
}

export function setUpEdit() {
  const run = new Run($("edit"));
  const input = $("edit-file");
  const strength = $("edit-strength");
  let shown = null;
  const say = () => { $("edit-strength-value").textContent = Number(strength.value).toFixed(2); };
  strength.addEventListener("input", say);
  say();

  function drop(file) {
    if (shown) URL.revokeObjectURL(shown);
    shown = URL.createObjectURL(file);
    $("edit-source").src = shown;
    $("edit-result").removeAttribute("src");
    $("edit-sweep").replaceChildren();
    $("edit").querySelector(".pair").hidden = false;
  }
  dropTarget($("edit-drop"), input, drop);

  let request = null;
  async function body() {
    if (!input.files.length) throw new ApiError("Choose or drop an image to edit first.");
    const out = { ...modelFields("edit"), images: [await fileBase64(input.files[0])],
      steps: Number($("edit-steps").value), strength: Number(strength.value) };
    const model = currentModel();
    if (model && model.conditional && $("edit-source-class").value !== "") {
      out.source_class_label = Number($("edit-source-class").value);
    }
    if (model && model.conditioning === "text" && $("edit-source-prompt").value) {
      out.source_prompt = $("edit-source-prompt").value;
    }
    request = out;
    return out;
  }

  async function onResult(answer) {
    $("edit-result").src = png(answer.images[0]);
    const k = answer.strength_steps;
    $("edit-result-caption").textContent = `Edit (strength ${answer.strength}, k = ${k})`;
    if (!$("edit-do-sweep").checked) return `Done: k = ${k} of S = ${answer.steps} steps each way.`;
    const sweep = await Promise.all(SWEEP.map(async (s) => {
      try {
        const one = await (await send("edit", { method: "POST", json: { ...request, strength: s } })).json();
        return el("figure", {}, el("img", { src: png(one.images[0]), alt: `edit at strength ${s}` }),
          el("figcaption", {}, `${s}`));
      } catch (e) {
        return el("figure", {}, el("figcaption", { class: "error" }, `${s}: ${e.message}`));
      }
    }));
    $("edit-sweep").replaceChildren(...sweep);
    return `Done: k = ${k} of S = ${answer.steps} steps each way; the sweep over ${SWEEP.join(", ")} beside it.`;
  }

  $("edit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run.start("edit", body, { onResult });
  });
  return run;
}
