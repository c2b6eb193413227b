// Auto-update: when the page asks for a mask by itself (an option changed, auto-update ticked on, a new image
// shown), the automatic request waiting for its short delay, and whether the result shown is said to be for the
// current settings (the stale note).

import { readControls, savePrefs } from "./prefs.js";
import { setStale, setStatus } from "./status.js";

const $ = (id) => document.getElementById(id);
const AUTO_DELAY_MS = 300;
export const STALE = "The result is for the previous settings: press Make mask (or Enter) to update it.";
const NEW_PROMPT = "Press Enter (or Make mask) to mask the new prompt.";

// app: {state (app.js's: image, result, inflight, pending, timer, said, pendingSaid), run() (the automatic request,
// now), supersede() (drops the request in flight and the one waiting), checkReady() ([sentence, field] when the
// inputs cannot be sent, else null), currentOptions() (the request options the form gives)}.
export function autoUpdate({ state, run, supersede, checkReady, currentOptions }) {
  function stopPending() {
    clearTimeout(state.timer);
    state.pending = null;
  }

  // Whether the result shown is for the image shown and the form's settings.
  function resultCurrent() {
    const r = state.result;
    return Boolean(r && r.imageId === state.image.id && JSON.stringify(r.opts) === JSON.stringify(currentOptions()));
  }

  // No request for the current settings is coming: whether the result shown is for them is said (the note for an
  // edited prompt, already shown, stays while it holds).
  function markStale() {
    if (!state.result) return;
    if (resultCurrent()) setStale(null);
    else if ($("stale-note").hidden) setStale(STALE);
  }

  // With auto-update on, ask for the current settings after `delay` ms (Esc stops it meanwhile). Inputs that cannot
  // be sent (a number field the API refuses: said beside it) ask nothing, and the result shown says it is stale.
  function schedule(delay = AUTO_DELAY_MS) {
    stopPending();
    if (!$("auto").checked) return;
    if (checkReady()) return markStale();
    state.pending = performance.now();
    state.pendingSaid = state.said;
    state.timer = setTimeout(run, delay);
  }

  // A request option changed: ask again (auto-update), or say whether the shown result is stale.
  function optionsChanged() {
    savePrefs(readControls());
    if (!state.image) return;
    if ($("auto").checked) schedule();
    else markStale();
  }

  // Auto-update ticked on: a result not for the current settings (or none) is asked for at once, as a change would
  // ask, or the status line says why it cannot be yet; ticked off: the automatic request waiting is not sent.
  function toggled() {
    savePrefs(readControls());
    if (!$("auto").checked) {
      if (state.pending === null) return;
      stopPending();
      return markStale();
    }
    if (!state.image || resultCurrent()) return;
    const problem = checkReady();
    if (!problem) return schedule(0);
    markStale();
    setStatus(`Auto-update is on; nothing asked yet. ${problem[0]}`);
  }

  // The prompt typed: nothing is asked until Enter (or Make mask); the note says so while it differs from the
  // result's, and, typed back to it, whether the result is stale for other settings.
  function promptEdited() {
    savePrefs(readControls());
    if (state.inflight || state.pending !== null) supersede(); // the request for the old prompt is no longer wanted
    if (!state.result) return;
    if (state.result.opts.prompt !== currentOptions().prompt) return setStale(NEW_PROMPT);
    setStale(null);
    markStale();
  }

  return { stopPending, markStale, schedule, optionsChanged, toggled, promptEdited };
}
