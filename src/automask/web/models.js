// The models this server offers (from web/config): the Model choice, its hint, and the prompt chips and
// placeholder that work with the chosen model.

import { suggestions } from "./prefs.js";

const $ = (id) => document.getElementById(id);

// The models as objects ({name, backend, open_vocabulary, loaded, ...}): config.choices, else (an older server)
// config.models, names only.
export function modelList(config) {
  if (Array.isArray(config.choices) && config.choices.length) return config.choices;
  const names = Array.isArray(config.models) ? config.models.filter((m) => typeof m === "string") : [];
  return names.map((name) => ({ name, open_vocabulary: null }));
}

export function fillModels(config) {
  const models = modelList(config);
  $("model").replaceChildren(
    ...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name === config.model ? `${m.name} (default)` : m.name;
      return option;
    }),
  );
  if (models.some((m) => m.name === config.model)) $("model").value = config.model;
  $("model-row").hidden = models.length < 2;
}

// The Model choice is shown (several models): the request names the chosen one.
export function choosingModel() {
  return !$("model-row").hidden && $("model").value !== "";
}

export function chosenModel(config) {
  const models = modelList(config);
  const name = choosingModel() ? $("model").value : config.model;
  return models.find((m) => m.name === name) || models[0] || null;
}

// Chips, placeholder and hint for the chosen model; a chip calls usePrompt(word).
export function showModel(config, usePrompt) {
  const model = chosenModel(config);
  const { chips, placeholder } = suggestions(model, config);
  $("prompt").placeholder = placeholder;
  $("chips").replaceChildren(
    ...chips.map((word) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.textContent = word;
      chip.addEventListener("click", () => usePrompt(word));
      return chip;
    }),
  );
  if (model) {
    const words = { true: "answers any words", false: "answers only person, subject and background words" };
    const loaded = model.loaded === false ? "; not loaded yet (its first request loads it)" : "";
    $("model-hint").textContent = `${model.name}: ${words[model.open_vocabulary] || "installed"}${loaded}.`;
  }
}

export function serverInfo(config) {
  const { auth, model, ready, max_image_bytes: maxBytes } = config;
  const parts = [];
  if (model && !choosingModel()) parts.push(`Model: ${model}${ready === false ? " (loading or not installed)" : ""}`);
  if (maxBytes) parts.push(`images up to ${(maxBytes / 1024 / 1024).toFixed(0)} MB`);
  if (!auth) parts.push("no API key needed on this local server");
  $("server-info").textContent = parts.join(" · ");
}
