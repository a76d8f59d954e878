// The playground's entry: the API key, the models (GET /models), the tabs, and the four tasks.

import { ApiError, getJSON, settings } from "./api.js";
import { setUpEdit, showEditSource } from "./edit.js";
import { setUpGenerate, setUpInterpolate, setUpInvert } from "./tasks.js";
import { $, el, models, showModel, showSchedules } from "./ui.js";

async function loadModels() {
  const status = $("server-status");
  try {
    const answer = await getJSON("models");
    // a model that failed to load is shown with its error, not offered
    const failed = answer.models.filter((m) => m.status === "failed");
    models.splice(0, models.length, ...answer.models.filter((m) => m.status !== "failed"));
    $("failed-models").replaceChildren(...failed.map((m) => el("li", { "data-model": m.name },
      `${m.name}: failed to load (${m.error})`)));
    $("failed-models").hidden = failed.length === 0;
    if (!models.length) throw new Error("no model could be loaded");
    const chosen = $("model").value;
    $("model").replaceChildren(...models.map((m) => el("option", { value: m.name },
      `${m.name} (${m.kind}, ${m.image_size.join("×")}, ${m.channels === 1 ? "grey" : "colour"}` +
      `${m.conditional ? ", conditional" : ""})`)));
    const fallback = models.find((m) => m.default) || models[0];
    $("model").value = models.some((m) => m.name === chosen) ? chosen : fallback.name;
    showModel();
    showEditSource();
    status.textContent = `Ready: ${models.length} model${models.length === 1 ? "" : "s"}` +
      (failed.length ? `; ${failed.length} failed to load.` : ".");
    status.dataset.state = "ready";
  } catch (e) {
    status.textContent = e instanceof ApiError ? `${e.message} Trying again…` : `Cannot list the models: ${e.message}`;
    status.dataset.state = "error";
    setTimeout(loadModels, 2000);
  }
}

function setUpTabs(runs) {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  function select(tab, focus) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
  }
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (to === undefined) return;
      e.preventDefault();
      select(tabs[(to + tabs.length) % tabs.length], true);
    });
  });
  // Escape cancels what runs in the visible panel
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    const run = runs.find((r) => !r.section.hidden && r.running);
    if (run) run.cancel();
  });
}

$("api-key").addEventListener("input", (e) => { settings.apiKey = e.target.value; });
$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", () => { showModel(); showEditSource(); });
$("sampler").addEventListener("change", showSchedules);
setUpTabs([setUpGenerate(), setUpInvert(), setUpInterpolate(), setUpEdit()]);
loadModels();
