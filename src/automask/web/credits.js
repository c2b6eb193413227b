// The API key (typed in, kept in this browser only) and its balance (GET v1/credits), shown beside the button.

import { fetchCredits } from "./api.js";
import { KEY_STORAGE } from "./prefs.js";

const $ = (id) => document.getElementById(id);
// The balance is looked up once the key field rests: a look-up per keystroke would send each partial key, and the
// server counts each as a failed authentication (past AUTOMASK_SERVER_AUTH_FAIL_LIMIT a minute, a 429 lock-out).
const KEY_LOOKUP_DELAY_MS = 800;

// config: the page's config (its `auth`: whether the server wants a key). Returns {apiKey(), restore(), edited(),
// refresh()}.
export function keyAndCredits(config) {
  let timer = 0;
  let seq = 0; // the latest look-up: an older one that answers later is ignored

  function apiKey() {
    return config.auth ? $("api-key").value.trim() : "";
  }

  // The key this browser kept, in the field (none when the server wants none).
  function restore() {
    $("key-row").hidden = !config.auth;
    $("api-key").value = config.auth ? localStorage.getItem(KEY_STORAGE) || "" : "";
  }

  function edited() {
    localStorage.setItem(KEY_STORAGE, apiKey());
    seq += 1; // a look-up of the key before this edit no longer answers
    $("credits").hidden = true;
    clearTimeout(timer);
    timer = setTimeout(refresh, KEY_LOOKUP_DELAY_MS);
  }

  async function refresh() {
    const box = $("credits");
    const mine = ++seq;
    const found = config.auth && apiKey() ? await fetchCredits(apiKey()) : null;
    if (mine !== seq) return; // a newer look-up answers
    box.hidden = !found;
    if (!found) return;
    const { credits } = found;
    box.dataset.credits = credits === null ? "unlimited" : String(credits);
    box.textContent = credits === null ? "Credits: unlimited" : `Credits left: ${credits.toLocaleString()}`;
  }

  return { apiKey, restore, edited, refresh };
}
